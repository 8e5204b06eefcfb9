"""What the StainNet output check (``wsi_norm.stain.qc.check_model_output``) measures for each
published checkpoint on the real sample slide and patches.

For each input, 10,000 tissue pixels are sampled as ``wsi-norm normalize --method stainnet``
samples them (``--n-pixels`` to change), mapped by each checkpoint, and the check's stain angles to
Ruifrok's vectors, Lab mean and findings are printed.

    python bench/model_output_check.py                 # ../shared/data, or $WSI_NORM_DATA
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CHECKPOINTS = ("StainNet-Public_layer3_ch32.pth", "StainNet-Public-centerUni_layer3_ch32.pth",
               "StainNet-3x0_best_psnr_layer3_ch32.pth")


def main() -> None:
    from wsi_norm.colormap.stainnet import load_stainnet_map
    from wsi_norm.slide import open_slide
    from wsi_norm.stain.qc import check_model_output
    from wsi_norm.testing.sample_data import data_dir
    from wsi_norm.tissue.sampling import sample_tissue_pixels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="the real-data folder (default: $WSI_NORM_DATA or ../shared/data)")
    ap.add_argument("--n-pixels", type=int, default=10_000)
    args = ap.parse_args()
    data = args.data or data_dir()
    inputs = [data / "slides" / "CMU-1-Small-Region.svs", data / "he" / "torchstain-source.png",
              data / "he" / "torchstain-target.png"]
    print("| input | checkpoint | H / E to Ruifrok (deg) | Lab mean | findings |\n| --- | --- | --- | --- | --- |")
    for path in inputs:
        with open_slide(path) as slide:
            sample = sample_tissue_pixels(slide, n_pixels=args.n_pixels, n_windows=16, n_glass_windows=4)
        for name in CHECKPOINTS:
            cmap = load_stainnet_map(data / "stainnet" / name)
            glass = cmap.evaluate_numpy(np.asarray([np.rint(sample.white.array)], dtype=np.uint8))[0]
            report = check_model_output(cmap.evaluate_numpy(sample.pixels), white=glass.astype(np.float64))
            angles = report.measures.get("output_stain_angles_to_ruifrok_deg", ["-", "-"])
            print(f"| {path.name} | {name} | {angles[0]} / {angles[1]} | {report.measures.get('output_lab_mean')} "
                  f"| {'; '.join(report.problems) or 'none'} |")


if __name__ == "__main__":
    main()
