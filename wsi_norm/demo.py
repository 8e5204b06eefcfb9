"""The README's main job on the bundled real sample: ``python -m wsi_norm.demo``.

Finds the sample slide (see :mod:`wsi_norm.sample_data`), prints its facts and tissue fraction
and writes its coarse tissue mask, everything under ``demo-out/``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wsi_norm.cli import main as cli_main
from wsi_norm.sample_data import find_sample_slide


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsi_norm.demo", description=__doc__)
    parser.add_argument("--out", default="demo-out", help="folder for the demo's outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sample = find_sample_slide(out / "cache")
    print(f"sample slide: {sample.path}\n  ({sample.description})\n")
    steps = [
        ["info", str(sample.path)],
        ["mask", str(sample.path), "-o", str(out / "mask.png"), "--overwrite"],
        ["mask", str(sample.path), "-o", str(out / "mask-overlay.png"), "--overlay",
         "--overwrite", "--max-px", "1024"],
    ]
    for step in steps:
        print(f"$ wsi-norm {' '.join(step)}")
        rc = cli_main(step)
        if rc:
            return rc
        print()
    print(f"outputs in {out.resolve()}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
