"""Print the SHA-256 of every decoded pyramid level of wsi-norm outputs (TIFF or OME-Zarr).

Two outputs whose lines agree hold the same pixels at every level, whatever their encoded bytes
or metadata (a changed provenance record or write time does not show here).

    python bench/level_digests.py OUT.tiff [OUT2.tiff ...]
"""

from __future__ import annotations

import argparse
import hashlib

from wsi_norm.errors import LevelError
from wsi_norm.writers import read_level


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outputs", nargs="+")
    args = ap.parse_args()
    for path in args.outputs:
        level = 0
        while True:
            try:
                pixels = read_level(path, level)
            except LevelError:
                break
            digest = hashlib.sha256(pixels.tobytes()).hexdigest()
            print(f"{path}  level {level}  {pixels.shape[1]}x{pixels.shape[0]}  sha256 {digest}")
            level += 1


if __name__ == "__main__":
    main()
