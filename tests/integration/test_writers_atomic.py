"""Atomic output: no overwrite without consent, clean failure, SIGKILL safety and resume."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
from numpy.typing import NDArray

from wsi_norm.errors import OutputError, OutputExistsError
from wsi_norm.pyramid import LevelStore
from wsi_norm.writers import read_level, read_provenance, write_pyramid

FORMATS = ["x.ome.zarr", "x.tif"]
REPO = Path(__file__).resolve().parents[2]


def _image(seed: int = 0, h: int = 2600, w: int = 1500) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs at ``path`` if this process may (root); yield whether it did."""
    path.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            check=False,
            capture_output=True,
        )
    except FileNotFoundError:
        yield False
        return
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("name", FORMATS)
def test_existing_output_is_refused(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    out.write_text("precious")
    with pytest.raises(OutputExistsError, match=rf"{name}: output exists; pass overwrite=True"):
        write_pyramid(_image(h=300, w=300), out, mpp=None, provenance={})
    assert out.read_text() == "precious"
    assert _leftovers(tmp_path) == [name]


@pytest.mark.parametrize("name", FORMATS)
def test_overwrite_replaces_output(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    write_pyramid(_image(1, h=1500, w=600), out, mpp=None, provenance={"run": 1})
    second = _image(2, h=700, w=900)
    write_pyramid(
        second, out, mpp=None, provenance={"run": 2}, overwrite=True, compression="deflate"
    )
    np.testing.assert_array_equal(read_level(out, 0), second)
    assert read_provenance(out)["run"] == 2
    assert _leftovers(tmp_path) == [name]


@pytest.mark.parametrize("name", FORMATS)
def test_missing_parent_folder(tmp_path: Path, name: str) -> None:
    out = tmp_path / "nope" / name
    with pytest.raises(OutputError, match=r"parent folder .*nope does not exist"):
        write_pyramid(_image(h=64, w=64), out, mpp=None, provenance={})


@pytest.mark.parametrize("name", FORMATS)
def test_read_only_folder(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ro"
    with _tmpfs(folder, "ro,size=1m") as mounted:
        if not mounted:
            if os.geteuid() == 0:  # root ignores permission bits: fake the answer
                monkeypatch.setattr(os, "access", lambda *a, **k: False)
            else:
                folder.chmod(0o500)
        try:
            with pytest.raises(OutputError, match=r"ro is not writable"):
                write_pyramid(_image(h=64, w=64), folder / name, mpp=None, provenance={})
        finally:
            if not mounted:
                folder.chmod(0o700)
        assert _leftovers(folder) == []


def _failing(image: NDArray[np.uint8], chunks: int, fail_at: tuple[int, int]) -> da.Array:
    def compute(
        block: NDArray[np.uint8], block_info: dict[int, dict[str, Any]] | None = None
    ) -> NDArray[np.uint8]:
        if tuple(block_info[0]["chunk-location"][:2]) == fail_at:  # type: ignore[index]
            raise RuntimeError("injected fault in chunk")
        return block

    source = da.from_array(image, chunks=(chunks, chunks, 3))  # type: ignore[no-untyped-call]  # dask is unannotated
    failing: da.Array = source.map_blocks(compute, dtype=np.uint8)
    return failing


@pytest.mark.parametrize("name", FORMATS)
def test_fault_midway_leaves_nothing(tmp_path: Path, name: str) -> None:
    array = _failing(_image(3), 512, fail_at=(3, 1))
    with pytest.raises(
        OutputError, match=rf"{name}: writing failed: RuntimeError: injected fault"
    ) as info:
        write_pyramid(array, tmp_path / name, mpp=(0.5, 0.5), provenance={})
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _leftovers(tmp_path) == []


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
@pytest.mark.parametrize("name", FORMATS)
def test_full_disk_leaves_nothing(
    tmp_path: Path, name: str, disk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: a real 1 MB tmpfs where this process may mount one, and always an injected
    ENOSPC in the lower-level spill (``LevelStore.write``, used by both writers), so the
    failure path runs on every machine, root or not."""
    folder = tmp_path / "small"
    with _tmpfs(folder, "size=1m") if disk == "tmpfs" else contextlib.nullcontext(False) as mounted:
        if not mounted:
            folder.mkdir(exist_ok=True)
            monkeypatch.setattr(LevelStore, "write", _no_space)
        # Random pixels do not compress: about 9 MB of output for a 1 MB disk.
        with pytest.raises(
            OutputError, match=rf"{name}: writing failed: .*No space left on device"
        ):
            write_pyramid(
                _image(4, h=2000, w=1500),
                folder / name,
                mpp=None,
                provenance={},
                compression="deflate",
            )
        assert _leftovers(folder) == []


_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np, dask.array as da
    from wsi_norm.writers import write_pyramid

    out, seed = sys.argv[1], int(sys.argv[2])
    image = np.random.default_rng(seed).integers(0, 256, (2600, 1500, 3), dtype=np.uint8)

    def slow(block):
        time.sleep(0.3)
        return block

    array = da.from_array(image, chunks=(512, 512, 3)).map_blocks(slow, dtype=np.uint8)
    write_pyramid(array, out, mpp=(0.5, 0.5), provenance={"seed": seed}, chunk_px=512, compression="deflate")
    """
)


def _start_and_kill(out: Path, ready: Callable[[], bool]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), "5"], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert child.poll() is None, "writer finished before it could be killed"
            assert time.monotonic() < deadline, "writer never got going"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL


def test_sigkill_zarr_then_resume_is_bit_identical(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    image = _image(5)
    reference = write_pyramid(
        image, tmp_path / "a" / "x.ome.zarr", mpp=(0.5, 0.5), provenance={"seed": 5}, chunk_px=512
    )
    out = tmp_path / "b" / "x.ome.zarr"
    marker = tmp_path / "b" / "x.ome.zarr.partial" / "wsi_norm_progress.json"

    def ready() -> bool:
        try:
            progress: dict[str, int] = json.loads(marker.read_text())
            return progress["level0_rows"] >= 512
        except (OSError, ValueError):
            return False

    _start_and_kill(out, ready)
    assert not out.exists()
    rows_done = json.loads(marker.read_text())["level0_rows"]
    assert 512 <= rows_done < 2600
    write_pyramid(image, out, mpp=(0.5, 0.5), provenance={"seed": 5}, chunk_px=512)
    assert _leftovers(tmp_path / "b") == ["x.ome.zarr"]
    for ref_file in sorted(
        p for p in reference.rglob("*") if p.is_file() and p.parent != reference
    ):
        assert (out / ref_file.relative_to(reference)).read_bytes() == ref_file.read_bytes(), (
            ref_file
        )
    for level in range(3):
        np.testing.assert_array_equal(read_level(out, level), read_level(reference, level))


def test_sigkill_tiff_then_rerun_matches(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    image = _image(5)
    reference = write_pyramid(
        image,
        tmp_path / "a" / "x.tif",
        mpp=(0.5, 0.5),
        provenance={"seed": 5},
        compression="deflate",
    )
    out = tmp_path / "b" / "x.tif"
    partial = tmp_path / "b" / "x.tif.partial"
    _start_and_kill(out, lambda: partial.exists() and partial.stat().st_size > 1_000_000)
    assert not out.exists()
    assert partial.exists()  # the killed run could not clean up; the next one does
    write_pyramid(image, out, mpp=(0.5, 0.5), provenance={"seed": 5}, compression="deflate")
    assert _leftovers(tmp_path / "b") == ["x.tif"]
    for level in range(3):
        np.testing.assert_array_equal(read_level(out, level), read_level(reference, level))
