"""Tests of wsi_norm.pyramid: level sizes, the 2x2 mean, the block stream and its store."""

from __future__ import annotations

import itertools
import threading
import tracemalloc
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from wsi_norm.pyramid import (
    Block,
    LevelStore,
    block_depth,
    block_edges,
    downsample_2x,
    iter_blocks,
    pyramid_shapes,
    reference_pyramid,
)


def _mean_2x2_float(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Independent reference: mean over the pixels that exist, rounded half up."""
    h, w, _ = image.shape
    padded = np.zeros((h + h % 2, w + w % 2, 3))
    count = np.zeros((h + h % 2, w + w % 2, 1))
    padded[:h, :w] = image
    count[:h, :w] = 1
    total = padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]
    n = count[0::2, 0::2] + count[1::2, 0::2] + count[0::2, 1::2] + count[1::2, 1::2]
    mean: NDArray[np.uint8] = np.floor(total / n + 0.5).astype(np.uint8)
    return mean


# Module-level so that distributed pickles the chunk function by reference and an
# in-process worker increments these very counters.
_COUNTS: dict[str, Counter[tuple[int, int]]] = {}
_COUNTS_LOCK = threading.Lock()


def _count_chunk(
    block: NDArray[np.uint8], block_info: dict[int, dict[str, Any]] | None = None, *, tag: str
) -> NDArray[np.uint8]:
    loc = block_info[0]["chunk-location"]  # type: ignore[index]
    with _COUNTS_LOCK:
        _COUNTS[tag][(loc[0], loc[1])] += 1
    return block.copy()


def _counting_array(
    image: np.ndarray, chunks: tuple[int, int]
) -> tuple[da.Array, Counter[tuple[int, int]]]:
    """Wrap ``image`` in a dask array whose chunk function counts its calls."""
    tag = f"counter-{len(_COUNTS)}"
    _COUNTS[tag] = Counter()
    source = da.from_array(image, chunks=(*chunks, 3))  # type: ignore[no-untyped-call]  # dask is unannotated
    return source.map_blocks(_count_chunk, dtype=np.uint8, tag=tag), _COUNTS[tag]


def test_pyramid_shapes_real_slide_size() -> None:
    assert pyramid_shapes(2967, 2220) == [(2967, 2220), (1484, 1110), (742, 555)]


def test_pyramid_shapes_small_image_has_one_level() -> None:
    assert pyramid_shapes(1024, 700) == [(1024, 700)]
    assert pyramid_shapes(1025, 1) == [(1025, 1), (513, 1)]


@given(st.integers(1, 200_000), st.integers(1, 200_000), st.integers(1, 4096))
def test_pyramid_shapes_rule(h: int, w: int, max_px: int) -> None:
    shapes = pyramid_shapes(h, w, max_px=max_px)
    assert shapes[0] == (h, w)
    for (h0, w0), (h1, w1) in itertools.pairwise(shapes):
        assert max(h0, w0) > max_px
        assert (h1, w1) == (-(-h0 // 2), -(-w0 // 2))
    assert max(shapes[-1]) <= max_px


def test_pyramid_shapes_rejects_empty() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        pyramid_shapes(0, 10)


def test_downsample_rounds_half_up_and_averages_odd_edges() -> None:
    image = np.zeros((3, 3, 3), dtype=np.uint8)
    image[..., 0] = [[0, 1, 7], [2, 3, 8], [5, 6, 9]]
    out = downsample_2x(image)
    # (0+1+2+3)/4 = 1.5 -> 2; (7+8)/2 = 7.5 -> 8; (5+6)/2 = 5.5 -> 6; corner 9.
    np.testing.assert_array_equal(out[..., 0], [[2, 8], [6, 9]])
    assert out.shape == (2, 2, 3)
    assert not out[..., 1:].any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_downsample_matches_float_reference(h: int, w: int, seed: int) -> None:
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    np.testing.assert_array_equal(downsample_2x(image), _mean_2x2_float(image))


def test_downsample_parallel_equals_serial() -> None:
    image = np.random.default_rng(1).integers(0, 256, (1501, 1203, 3), dtype=np.uint8)
    with ThreadPoolExecutor(3) as pool:
        parallel = downsample_2x(image, executor=pool)
    np.testing.assert_array_equal(parallel, downsample_2x(image))
    np.testing.assert_array_equal(parallel, _mean_2x2_float(image))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 600), st.integers(1, 90), st.integers(0, 2**32 - 1), st.booleans())
def test_downsample_numpy_twin_equals_the_compiled_kernel(h: int, w: int, seed: int, extremes: bool) -> None:
    # small images are downsampled in numpy (no numba import for a biopsy), large ones by the
    # compiled kernel: the same integers, odd edges and slab boundaries (256 rows) included
    from wsi_norm.pyramid import _compiled_kernel, _downsample_numpy

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if extremes:
        image = np.where(image < 128, 0, 255).astype(np.uint8)
    shape = ((h + 1) // 2, (w + 1) // 2, 3)
    compiled, twin = np.empty(shape, np.uint8), np.empty(shape, np.uint8)
    _compiled_kernel()(image, compiled)
    _downsample_numpy(image, twin)
    np.testing.assert_array_equal(twin, compiled)
    np.testing.assert_array_equal(twin, _mean_2x2_float(image))


def test_downsample_keeps_constant_and_extremes() -> None:
    for value in (0, 128, 255):
        image = np.full((7, 5, 3), value, dtype=np.uint8)
        assert (downsample_2x(image) == value).all()


def test_downsample_rejects_wrong_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        downsample_2x(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        downsample_2x(np.zeros((4, 4), dtype=np.uint8))


def _stream(
    array: da.Array,
    tmp_path: Path,
    *,
    max_px: int = 1024,
    row_edges: list[int] | None = None,
    col_edges: list[int] | None = None,
    **kwargs: Any,
) -> tuple[list[Block], list[np.ndarray]]:
    """Run iter_blocks; return its blocks and every lower level read back from the store."""
    shapes = pyramid_shapes(*array.shape[:2], max_px=max_px)
    row_edges = row_edges or block_edges(array.chunks[0], target=1024)
    col_edges = col_edges or block_edges(array.chunks[1], target=1024)
    with LevelStore(tmp_path / "levels", shapes, row_edges, col_edges) as store:
        blocks = list(iter_blocks(array, store, **kwargs))
        lower = [store.read(k, 0, h) for k, (h, _) in enumerate(shapes) if k]
    assert not (tmp_path / "levels").exists()
    return blocks, lower


def _assemble(blocks: list[Block], shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    seen = np.zeros(shape[:2], dtype=np.int32)
    for b in blocks:
        assert b.pixels is not None and b.shape == b.pixels.shape[:2]
        h, w = b.pixels.shape[:2]
        out[b.row : b.row + h, b.col : b.col + w] = b.pixels
        seen[b.row : b.row + h, b.col : b.col + w] += 1
    assert seen.min() == seen.max() == 1  # every pixel in exactly one block
    return out


def test_iter_blocks_uneven_chunks_matches_eager_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (2701, 2333, 3), dtype=np.uint8)
    # odd chunk rows: bands of two chunks (dask is unannotated: no-untyped-call)
    array = da.from_array(image, chunks=(333, 500, 3))  # type: ignore[no-untyped-call]
    row_edges = block_edges(array.chunks[0], target=300)
    col_edges = block_edges(array.chunks[1], target=300)
    assert row_edges[:3] == [0, 666, 1332] and col_edges[:3] == [0, 500, 1000]
    blocks, lower = _stream(array, tmp_path, max_px=300, row_edges=row_edges, col_edges=col_edges)
    reference = reference_pyramid(image, max_px=300)
    assert len(reference) == 5
    order = [(b.row, b.col) for b in blocks]
    assert order == sorted(order)  # band by band, left to right
    assert [b.band_end for b in blocks] == [b.col + b.shape[1] == 2333 for b in blocks]
    assert [b.final for b in blocks] == [False] * (len(blocks) - 1) + [True]
    np.testing.assert_array_equal(_assemble(blocks, image.shape), image)
    for level, expected in enumerate(reference[1:], start=1):
        np.testing.assert_array_equal(lower[level - 1], expected)


def test_iter_blocks_deep_levels_from_misaligned_chunks(tmp_path: Path) -> None:
    # 960-px chunks (4 Aperio tiles) align to 2**6 only: levels 7.. come from full-width rows
    image = np.random.default_rng(6).integers(0, 256, (3000, 70_000 // 8, 3), dtype=np.uint8)
    array = da.from_array(image, chunks=(960, 960, 3))  # type: ignore[no-untyped-call]  # dask is unannotated
    row_edges = block_edges(array.chunks[0], target=960)
    col_edges = block_edges(array.chunks[1], target=960)
    shapes = pyramid_shapes(*image.shape[:2], max_px=60)
    assert len(shapes) == 9 and block_depth(row_edges, col_edges, len(shapes)) == 6
    _, lower = _stream(array, tmp_path, max_px=60, row_edges=row_edges, col_edges=col_edges)
    for got, expected in zip(lower, reference_pyramid(image, max_px=60)[1:], strict=True):
        np.testing.assert_array_equal(got, expected)


def test_iter_blocks_computes_each_chunk_once_for_five_levels(tmp_path: Path) -> None:
    image = np.random.default_rng(3).integers(0, 256, (8200, 300, 3), dtype=np.uint8)
    array, counts = _counting_array(image, (700, 128))
    calls: list[tuple[int, int]] = []
    blocks, lower = _stream(
        array, tmp_path, progress=lambda done, total: calls.append((done, total))
    )
    assert len(lower) == 4  # 8200 -> 4100 -> 2050 -> 1025 -> 513
    n_chunks = array.numblocks[0] * array.numblocks[1]
    assert len(counts) == n_chunks
    assert set(counts.values()) == {1}
    assert calls[-1] == (n_chunks, n_chunks) and len(calls) == len(blocks)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    np.testing.assert_array_equal(lower[-1], reference_pyramid(image)[-1])


def test_iter_blocks_with_distributed_client_computes_each_chunk_once(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    image = np.random.default_rng(4).integers(0, 256, (2100, 1500, 3), dtype=np.uint8)
    array, counts = _counting_array(image, (512, 512))
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
    ):
        blocks, lower = _stream(array, tmp_path)
    assert set(counts.values()) == {1} and len(counts) == 15
    np.testing.assert_array_equal(_assemble(blocks, image.shape), image)
    np.testing.assert_array_equal(lower[0], reference_pyramid(image)[1])


def test_iter_blocks_resume_replays_lower_levels_only(tmp_path: Path) -> None:
    image = np.random.default_rng(5).integers(0, 256, (2500, 1100, 3), dtype=np.uint8)
    array, counts = _counting_array(image, (600, 600))
    row_edges = block_edges(array.chunks[0], target=600)
    start = row_edges[2]
    blocks, lower = _stream(
        array,
        tmp_path,
        row_edges=row_edges,
        start_row=start,
        read_done=lambda r0, r1, c0, c1: image[r0:r1, c0:c1],
    )
    assert blocks[0].row == start == 1200
    rows = np.concatenate(
        [np.concatenate([b.pixels for b in blocks if b.row == r], axis=1) for r in row_edges[2:-1]]
    )
    np.testing.assert_array_equal(rows, image[start:])
    assert min(r for r, _ in counts) == 2  # chunk rows 0 and 1 (rows 0-1199) were never computed
    for got, expected in zip(lower, reference_pyramid(image)[1:], strict=True):
        np.testing.assert_array_equal(got, expected)


def test_iter_blocks_rejects_bad_input(tmp_path: Path) -> None:
    def first(array: da.Array, row_edges: list[int] | None = None, **kwargs: Any) -> None:
        shapes = pyramid_shapes(*array.shape[:2])
        with LevelStore(tmp_path / "s", shapes, row_edges) as store:
            next(iter_blocks(array, store, **kwargs))

    with pytest.raises(TypeError, match="uint8"):
        first(da.zeros((10, 10, 3), dtype=np.uint16))
    array = da.zeros((2000, 10, 3), dtype=np.uint8, chunks=(500, 10, 3))
    with pytest.raises(ValueError, match="read_done"):
        first(array, row_edges=[0, 1000, 2000], start_row=1000)
    with pytest.raises(ValueError, match="not a block edge"):
        first(array, row_edges=[0, 1000, 2000], start_row=500)
    with pytest.raises(ValueError, match="not even chunk edges"):
        first(array, row_edges=[0, 750, 2000])
    with (
        pytest.raises(ValueError, match="store is for"),
        LevelStore(tmp_path / "t", pyramid_shapes(10, 10)) as store,
    ):
        next(iter_blocks(array, store))


@given(
    st.lists(st.integers(1, 700), min_size=1, max_size=30),
    st.integers(16, 2048),
    st.sampled_from([1, 16, 256, 1024]),
)
@settings(max_examples=200, deadline=None)
def test_block_edges_are_even_chunk_edges(chunks: list[int], target: int, align: int) -> None:
    edges = block_edges(tuple(chunks), target=target, align=align)
    bounds = set(itertools.accumulate(chunks, initial=0))
    assert edges[0] == 0 and edges[-1] == sum(chunks)
    assert all(b > a for a, b in itertools.pairwise(edges))
    assert all(e in bounds and e % 2 == 0 for e in edges[1:-1])


def test_level_store_round_trips_blocks_and_refuses_outside(tmp_path: Path) -> None:
    shapes = [(200, 180), (100, 90), (50, 45), (25, 23)]
    levels = reference_pyramid(
        np.random.default_rng(7).integers(0, 256, (200, 180, 3), dtype=np.uint8), max_px=25
    )
    # blocks of 64 x 80 px align to 2**4 (16) rows and columns: levels 1 and 2 by blocks
    with LevelStore(tmp_path / "s", shapes, [0, 64, 128, 200], [0, 80, 160, 180]) as store:
        assert store.depth == len(shapes) - 1
        assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
            "level1.raw",
            "level2.raw",
            "level3.raw",
        ]
        assert store.grid(2) == ([0, 16, 32, 50], [0, 20, 40, 45])
        for k in (1, 2, 3):
            rows, cols = store.grid(k)
            for (r0, r1), (c0, c1) in itertools.product(
                itertools.pairwise(rows), itertools.pairwise(cols)
            ):
                store.write(k, r0, c0, levels[k][r0:r1, c0:c1])
            np.testing.assert_array_equal(store.read(k, 0, shapes[k][0]), levels[k])
        np.testing.assert_array_equal(store.read(1, 7, 91, 3, 84), levels[1][7:91, 3:84])
        np.testing.assert_array_equal(store.read(2, 40, 99, 40, 99), levels[2][40:, 40:])  # clipped
        with pytest.raises(ValueError, match="not a block origin"):
            store.write(1, 5, 0, levels[1][5:37, :40])
        with pytest.raises(ValueError, match="must be 32 x 40"):
            store.write(1, 0, 0, levels[1][:30, :40])
        with pytest.raises(ValueError, match="not stored"):
            store.write(0, 0, 0, levels[0])  # level 0 is not stored
    assert not (tmp_path / "s").exists()
    # edges at 2 (mod 4): blocks cover level 1 only; level 2 is stored by full-width rows
    with LevelStore(tmp_path / "r", shapes, [0, 66, 200], [0, 90, 180]) as store:
        assert store.depth == 1
        with pytest.raises(ValueError, match="full-width rows"):
            store.write(2, 0, 0, levels[2][:10, :20])
        store.write(2, 0, 0, levels[2][:33])
        store.write(2, 33, 0, levels[2][33:])
        np.testing.assert_array_equal(store.read(2, 10, 40, 5, 30), levels[2][10:40, 5:30])


def _noise_chunk(block: NDArray[np.uint8], block_info: dict[int, dict[str, Any]] | None = None) -> NDArray[np.uint8]:
    seed = block_info[0]["chunk-location"]  # type: ignore[index]
    return np.random.default_rng(list(seed)).integers(0, 256, block.shape, dtype=np.uint8)


def test_iter_blocks_memory_does_not_grow_with_width(tmp_path: Path) -> None:
    """Peak traced allocation streaming a 4x wider image grows by well under half (a buffer that
    scaled with the width would make it ~4x)."""

    def peak(width: int) -> int:
        array = da.zeros((4096, width, 3), dtype=np.uint8, chunks=(1024, 1024, 3)).map_blocks(
            _noise_chunk, dtype=np.uint8
        )
        shapes = pyramid_shapes(4096, width)
        edges = [block_edges(c, target=1024) for c in array.chunks[:2]]
        tracemalloc.start()
        try:
            with LevelStore(tmp_path / f"w{width}", shapes, *edges) as store:
                for _ in iter_blocks(array, store):
                    pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(1024)  # first use: numba and dask set-up allocate once
    # the least of two runs each: how many blocks the threads hold at once varies with the
    # machine's load (one loaded run measured 12.8 MiB narrow against 16.1 wide, another 45.6
    # against 16.5, a CI run 13.1 against 16.4); what the layout needs is the floor under that
    # noise. Some growth is by design: the levels below a block's depth are built from full-width
    # rows, 2**depth times narrower than level 0 (~0.75 MiB more per 4096 px of width here)
    narrow, wide = min(peak(4096), peak(4096)), min(peak(16384), peak(16384))
    print(f"peak traced: {narrow / 2**20:.1f} MiB at 4096 wide, {wide / 2**20:.1f} MiB at 16384")
    assert wide <= 1.5 * narrow, (narrow, wide)
