"""Check that a finished output is complete, from its metadata alone (no pixel is read).

A skip decision ("this output is current") must not trust an output that was damaged
after it was written: a deleted level, a missing chunk or shard file, a truncated TIFF.
:func:`output_facts` reads what the output says it holds and checks that it is all there:

* **OME-Zarr**: every level the provenance records has its array metadata with the
  recorded shape ``(3, rows, cols)``, and every chunk (zarr v2) or shard (zarr v3) key
  that the shape and the chunk grid imply is stored as a non-empty file.
* **TIFF**: the file parses, every level the provenance records is a page with the
  recorded shape and the expected number of tiles, and every tile's offset + byte count
  lies inside the file.

The facts it returns (format, level shapes, stored keys and bytes per level or the file
size) can be recorded when an output is known to be complete and compared later with
:func:`verify_output`: a shard truncated in place changes its level's byte count.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from itertools import product
from pathlib import Path
from typing import Any

from ..errors import OutputError
from .provenance import read_provenance

__all__ = ["output_facts", "verify_output"]


def output_facts(out: str | Path) -> dict[str, Any]:
    """Return what a finished output holds, after checking that all of it is there.

    Parameters
    ----------
    out : str or Path
        An OME-Zarr folder or TIFF file written by :func:`wsi_norm.writers.write_pyramid`.

    Returns
    -------
    dict
        ``{"format", "levels": [[rows, cols], ...]}`` plus, for OME-Zarr, ``"stored"``:
        ``[[n_keys, n_bytes], ...]`` per level; for TIFF, ``"size_bytes"`` and ``"tiles"``
        (tiles per level).

    Raises
    ------
    OutputError
        The output is missing, has no provenance, or is incomplete; the message names the
        output, the level and what is missing.
    """
    out = Path(out)
    record = read_provenance(out)
    try:
        levels = [(int(h), int(w)) for h, w in record["written"]["levels"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise OutputError(f"{out}: provenance records no pyramid levels: {exc}") from exc
    if not levels:
        raise OutputError(f"{out}: provenance records no pyramid levels")
    if out.is_dir():
        return _zarr_facts(out, levels)
    return _tiff_facts(out, levels)


def verify_output(out: str | Path, *, expected: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check an output with :func:`output_facts`, and against ``expected`` facts if given.

    Parameters
    ----------
    out : str or Path
    expected : mapping, optional
        Facts recorded when the output was known to be complete.

    Returns
    -------
    dict
        The output's facts.

    Raises
    ------
    OutputError
        Incomplete, or its facts differ from ``expected`` (the message names each difference).
    """
    facts = output_facts(out)
    if expected is not None:
        differ = [
            f"{key} {facts.get(key)!r}, recorded {expected.get(key)!r}"
            for key in sorted(set(facts) | set(expected))
            if _plain(facts.get(key)) != _plain(expected.get(key))
        ]
        if differ:
            raise OutputError(f"{out}: changed since it was recorded complete: {'; '.join(differ)}")
    return facts


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise OutputError(f"{path}: array metadata missing") from exc
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: unreadable array metadata: {exc}") from exc
    if not isinstance(doc, dict):
        raise OutputError(f"{path}: array metadata is not a JSON object")
    return doc


def _zarr_facts(out: Path, levels: list[tuple[int, int]]) -> dict[str, Any]:
    stored = []
    v3 = (out / "zarr.json").is_file()
    for k, (h, w) in enumerate(levels):
        folder = out / str(k)
        if v3:
            meta = _read_json(folder / "zarr.json")
            try:
                grid = [int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"]]
                encoding = meta.get("chunk_key_encoding", {"name": "default"})
                default = encoding.get("name", "default") == "default"
                sep = str(encoding.get("configuration", {}).get("separator", "/" if default else "."))
                prefix = "c" + sep if default else ""
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise OutputError(f"{folder / 'zarr.json'}: no regular chunk grid: {exc}") from exc
        else:
            meta = _read_json(folder / ".zarray")
            try:
                grid = [int(c) for c in meta["chunks"]]
            except (KeyError, TypeError, ValueError) as exc:
                raise OutputError(f"{folder / '.zarray'}: no chunk shape: {exc}") from exc
            sep, prefix = str(meta.get("dimension_separator") or "."), ""
        shape = [int(n) for n in meta.get("shape", [])]
        if shape != [3, h, w]:
            raise OutputError(f"{out}: level {k} has shape {shape}, the provenance records {[3, h, w]}")
        if len(grid) != 3 or min(grid) <= 0:
            raise OutputError(f"{out}: level {k} has an invalid chunk shape {grid}")
        counts = [math.ceil(n / c) for n, c in zip(shape, grid, strict=True)]
        n_bytes = 0
        missing: list[str] = []
        for index in product(*(range(n) for n in counts)):
            key = prefix + sep.join(map(str, index))
            try:
                size = os.stat(folder / key).st_size
            except FileNotFoundError:
                size = 0
            if size == 0:
                missing.append(key)
            n_bytes += size
        if missing:
            total = math.prod(counts)
            raise OutputError(
                f"{out}: level {k} is incomplete: {len(missing)} of {total} chunk/shard files "
                f"missing or empty (first: {missing[0]})"
            )
        stored.append([math.prod(counts), n_bytes])
    return {"format": "ome-zarr", "levels": [list(s) for s in levels], "stored": stored}


def _tiff_facts(out: Path, levels: list[tuple[int, int]]) -> dict[str, Any]:
    import tifffile

    try:
        size = out.stat().st_size
        with tifffile.TiffFile(out) as tif:
            pages = []
            for k in range(len(levels)):
                if k >= len(tif.pages):
                    raise OutputError(
                        f"{out}: level {k} is missing: the file has {len(tif.pages)} pages, "
                        f"the provenance records {len(levels)} levels"
                    )
                page = tif.pages[k]
                pages.append((tuple(page.shape[:2]), tuple(page.tile or ()), list(page.dataoffsets),
                              list(page.databytecounts)))
    except OutputError:
        raise
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise OutputError(f"{out}: cannot read the TIFF structure: {exc}") from exc
    tiles = []
    for k, ((shape, tile, offsets, counts), (h, w)) in enumerate(zip(pages, levels, strict=True)):
        if shape != (h, w):
            raise OutputError(f"{out}: level {k} is {list(shape)}, the provenance records {[h, w]}")
        expected = math.ceil(h / tile[0]) * math.ceil(w / tile[1]) if len(tile) == 2 else len(offsets)
        if len(offsets) != expected or len(counts) != expected:
            raise OutputError(f"{out}: level {k} has {len(offsets)} tiles, {expected} expected")
        for i, (offset, count) in enumerate(zip(offsets, counts, strict=True)):
            if offset <= 0 or count <= 0 or offset + count > size:
                raise OutputError(
                    f"{out}: level {k} tile {i} lies outside the file (offset {offset} + {count} "
                    f"bytes, file size {size}): the file is truncated or damaged"
                )
        tiles.append(expected)
    return {"format": "tiff", "levels": [list(s) for s in levels], "size_bytes": size, "tiles": tiles}
