"""Tests of wsi_norm.pyramid: level sizes, the 2x2 mean, and the one-pass stream."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_norm.pyramid import downsample_2x, iter_pyramid, pyramid_shapes, reference_pyramid


def _mean_2x2_float(image: np.ndarray) -> np.ndarray:
    """Independent reference: mean over the pixels that exist, rounded half up."""
    h, w, _ = image.shape
    padded = np.zeros((h + h % 2, w + w % 2, 3))
    count = np.zeros((h + h % 2, w + w % 2, 1))
    padded[:h, :w] = image
    count[:h, :w] = 1
    total = padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]
    n = count[0::2, 0::2] + count[1::2, 0::2] + count[0::2, 1::2] + count[1::2, 1::2]
    return np.floor(total / n + 0.5).astype(np.uint8)


# Module-level so that distributed pickles the chunk function by reference and an
# in-process worker increments these very counters.
_COUNTS: dict[str, Counter[tuple[int, int]]] = {}
_COUNTS_LOCK = threading.Lock()


def _count_chunk(block: np.ndarray, block_info: dict | None = None, *, tag: str) -> np.ndarray:
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
    source = da.from_array(image, chunks=(*chunks, 3))
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


def test_downsample_keeps_constant_and_extremes() -> None:
    for value in (0, 128, 255):
        image = np.full((7, 5, 3), value, dtype=np.uint8)
        assert (downsample_2x(image) == value).all()


def test_downsample_rejects_wrong_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        downsample_2x(np.zeros((4, 4, 3), dtype=np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        downsample_2x(np.zeros((4, 4), dtype=np.uint8))


def test_iter_pyramid_uneven_chunks_matches_eager_reference() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (2701, 2333, 3), dtype=np.uint8)
    array = da.from_array(image, chunks=(333, 500, 3))  # odd band heights: carries between bands
    strips = list(iter_pyramid(array, max_px=300))
    reference = reference_pyramid(image, max_px=300)
    assert len(reference) == 5
    for level, expected in enumerate(reference):
        mine = [s for s in strips if s.level == level]
        assert [s.row for s in mine] == list(
            np.cumsum([0] + [s.pixels.shape[0] for s in mine[:-1]])
        )
        assert mine[-1].final and not any(s.final for s in mine[:-1])
        np.testing.assert_array_equal(np.concatenate([s.pixels for s in mine]), expected)


def test_iter_pyramid_computes_each_chunk_once_for_five_levels() -> None:
    image = np.random.default_rng(3).integers(0, 256, (8200, 300, 3), dtype=np.uint8)
    array, counts = _counting_array(image, (700, 128))
    calls: list[tuple[int, int]] = []
    strips = list(iter_pyramid(array, progress=lambda done, total: calls.append((done, total))))
    assert max(s.level for s in strips) == 4  # 8200 -> 4100 -> 2050 -> 1025 -> 513
    n_blocks = array.numblocks[0] * array.numblocks[1]
    assert len(counts) == n_blocks
    assert set(counts.values()) == {1}
    assert calls[-1] == (n_blocks, n_blocks)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_iter_pyramid_with_distributed_client_computes_each_chunk_once() -> None:
    distributed = pytest.importorskip("distributed")
    image = np.random.default_rng(4).integers(0, 256, (2100, 1500, 3), dtype=np.uint8)
    array, counts = _counting_array(image, (512, 512))
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
    ):
        strips = list(iter_pyramid(array))
    assert set(counts.values()) == {1} and len(counts) == 15
    level1 = np.concatenate([s.pixels for s in strips if s.level == 1])
    np.testing.assert_array_equal(level1, reference_pyramid(image)[1])


def test_iter_pyramid_resume_replays_lower_levels_only() -> None:
    image = np.random.default_rng(5).integers(0, 256, (2500, 1100, 3), dtype=np.uint8)
    array, counts = _counting_array(image, (600, 600))
    start = 1024
    strips = list(
        iter_pyramid(array, start_row=start, read_done=lambda a, b: image[a:b], replay_px=512)
    )
    level0 = [s for s in strips if s.level == 0]
    assert level0[0].row == start
    np.testing.assert_array_equal(np.concatenate([s.pixels for s in level0]), image[start:])
    assert min(r for r, _ in counts) == 1  # chunk row 0 (rows 0-599) was never computed
    reference = reference_pyramid(image)
    for level in range(1, len(reference)):
        got = np.concatenate([s.pixels for s in strips if s.level == level])
        np.testing.assert_array_equal(got, reference[level])


def test_iter_pyramid_rejects_bad_arrays() -> None:
    with pytest.raises(TypeError, match="uint8"):
        next(iter_pyramid(da.zeros((10, 10, 3), dtype=np.uint16)))
    with pytest.raises(ValueError, match="read_done"):
        next(iter_pyramid(da.zeros((10, 10, 3), dtype=np.uint8), start_row=5))
