"""The completion record of one slide: written last, after its outputs and its QC.

A slide counts as finished only when this record exists and still describes what is on
disk.  It lives beside the slide's QC, ``<output_root>/qc/<site>/<slide>/complete.json``,
and is written (to a temporary file, then renamed) only after every output was committed
and the QC files were written, so a run killed between the outputs and the QC leaves no
record and the next run does the slide again.

It holds, per output, the provenance fingerprint and creation time of the output the QC
was computed on, and that output's facts (:func:`wsi_norm.writers.verify.output_facts`:
levels, stored chunk/shard bytes, TIFF size), checked again before a skip.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.manifest import Manifest, SlideEntry
from wsi_norm.errors import OutputError

__all__ = ["COMPLETION_FILE", "completion_path", "is_complete", "write_completion"]

log = logging.getLogger(__name__)

COMPLETION_FILE = "complete.json"
_SCHEMA = 1


def completion_path(manifest: Manifest, entry: SlideEntry) -> Path:
    """``<output_root>/qc/<site>/<slide stem>/complete.json``."""
    return manifest.output_root / "qc" / entry.site / entry.source.stem / COMPLETION_FILE


def _output_record(out: Path) -> dict[str, Any]:
    from wsi_norm.writers import read_provenance
    from wsi_norm.writers.verify import output_facts

    record = read_provenance(out)
    return {
        "path": str(out),
        "fingerprint": record.get("fingerprint"),
        "created": record.get("written", {}).get("created"),
        "facts": output_facts(out),
    }


def write_completion(manifest: Manifest, entry: SlideEntry, *, qc_dir: str | os.PathLike[str]) -> Path:
    """Record that ``entry``'s outputs and QC are complete (call it last, holding the claims).

    Raises
    ------
    OutputError
        An output is incomplete (nothing is recorded), or the record cannot be written.
    """
    path = completion_path(manifest, entry)
    doc = {
        "schema": _SCHEMA,
        "slide": str(entry.source),
        "completed": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "outputs": {fmt: _output_record(out) for fmt, out in entry.outputs.items()},
        "qc_dir": str(qc_dir),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the completion record: {exc}") from exc
    return path


def is_complete(manifest: Manifest, entry: SlideEntry) -> bool:
    """True when the slide's completion record exists and matches its outputs and QC on disk.

    The caller has already checked that each output is current (same request); this checks
    that the QC was done on exactly these outputs and that they are still as recorded.
    """
    from wsi_norm.writers import read_provenance
    from wsi_norm.writers.verify import verify_output

    path = completion_path(manifest, entry)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        log.info("%s: no completion record (outputs or QC unfinished)", entry.source)
        return False
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable completion record %s: %s", entry.source, path, exc)
        return False
    recorded = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(recorded, Mapping) or set(recorded) != set(entry.outputs):
        log.info("%s: the completion record lists other outputs", entry.source)
        return False
    if not (Path(str(doc.get("qc_dir", ""))) / "metrics.json").is_file():
        log.info("%s: QC metrics missing", entry.source)
        return False
    for fmt, out in entry.outputs.items():
        rec = recorded[fmt]
        try:
            prov = read_provenance(out)
            if (prov.get("fingerprint"), prov.get("written", {}).get("created")) != (
                rec.get("fingerprint"), rec.get("created")
            ):
                log.info("%s: %s is not the output the QC was computed on", entry.source, out)
                return False
            verify_output(out, expected=rec.get("facts"))
        except (OutputError, AttributeError) as exc:
            log.warning("%s: %s", entry.source, exc)
            return False
    return True
