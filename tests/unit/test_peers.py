"""Agreement with torchstain (Macenko vectors) and a side-by-side comparison on the real H&E pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2lab
from test_stain_macenko import load_he

from wsi_norm.color import is_background
from wsi_norm.colormap import compile_colormap
from wsi_norm.metrics import psnr, ssim, stain_matrix_angles_deg
from wsi_norm.stain import METHODS, StainParams, fit_stats
from wsi_norm.stain.macenko import fit_macenko

torchstain = pytest.importorskip("torchstain")


@pytest.mark.parametrize("name", ["source", "target"])
def test_textbook_macenko_agrees_with_torchstain(name: str) -> None:
    img = load_he(name)
    norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    norm.fit(img)
    theirs = norm.HERef.T  # (2, 3) rows H, E
    # torchstain fits on all pixels of the patch, textbook beta rule
    ours = fit_macenko(img.reshape(-1, 3), StainParams(macenko_variant="textbook")).stain_matrix
    angles = stain_matrix_angles_deg(ours, theirs)
    print(f"{name}: angle to torchstain H,E = {angles.round(3)}")
    assert np.all(angles < 2.0), angles


def test_normalise_source_to_target_all_methods(tmp_path: Path) -> None:
    src, tgt = load_he("source"), load_he("target")
    src_tissue = ~is_background(src)
    results = {}
    from wsi_norm.tissue.sampling import tissue_blocks

    for method in METHODS:
        # as the pipeline fits: stain vectors on 2 x 2 block means, the rest on pixels
        blocks = method in ("macenko", "vahadane")
        s_data = tissue_blocks(src) if blocks else src.reshape(-1, 3)
        t_data = tissue_blocks(tgt) if blocks else tgt.reshape(-1, 3)
        cmap = compile_colormap(method, fit_stats(method, s_data, StainParams(max_fit_pixels=5000)),
                                fit_stats(method, t_data, StainParams(max_fit_pixels=5000)))
        results[method] = cmap.apply(src)
    mac = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    mac.fit(tgt)
    results["torchstain-macenko"] = np.asarray(mac.normalize(I=src, stains=False)[0]).astype(np.uint8)
    rein = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
    rein.fit(tgt)
    results["torchstain-reinhard"] = np.asarray(rein.normalize(I=src)).astype(np.uint8)

    tgt_lab = rgb2lab(tgt[~is_background(tgt)][None])[0].mean(0)
    src_lab = rgb2lab(src[src_tissue][None])[0].mean(0)
    h, w = min(src.shape[0], tgt.shape[0]), min(src.shape[1], tgt.shape[1])
    lines = [f"{'method':22s} {'dLab(mean) to tgt':>18s} {'SSIM src':>9s} {'PSNR tgt*':>9s}"]
    lines.append(f"{'(unnormalised)':22s} {np.linalg.norm(src_lab - tgt_lab):18.2f} {1.0:9.3f} {psnr(src[:h, :w], tgt[:h, :w]):9.2f}")
    dist = {}
    for name, out in results.items():
        lab = rgb2lab(out[src_tissue][None])[0].mean(0)
        dist[name] = float(np.linalg.norm(lab - tgt_lab))
        lines.append(f"{name:22s} {dist[name]:18.2f} {ssim(out, src):9.3f} {psnr(out[:h, :w], tgt[:h, :w]):9.2f}")
    print("\n".join(lines) + "\n(* the pair is not registered: PSNR to target is only indicative)")
    Image.fromarray(np.concatenate([src] + list(results.values()), axis=1)).save(tmp_path / "side_by_side.png")
    assert (tmp_path / "side_by_side.png").stat().st_size > 0
    base = float(np.linalg.norm(src_lab - tgt_lab))
    for method in METHODS:
        assert dist[method] < 0.5 * base, (method, dist[method], base)
        assert ssim(results[method], src) > 0.6  # structure preserved
