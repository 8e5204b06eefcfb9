"""ColorMap: LUT == numpy reference, torch within 1 level, every pixel mapped, per-pixel, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.typing import NDArray
from test_stain_macenko import load_he

from wsi_norm.colormap import ColorMap, compile_colormap
from wsi_norm.colormap.maps import GlassBlend
from wsi_norm.errors import FitError
from wsi_norm.stain import METHODS, StainParams, fit_stats
from wsi_norm.stain.macenko import MacenkoStats

FAST = StainParams(max_fit_pixels=5000)
SRC_WHITE, TGT_WHITE = (236.0, 232.0, 246.0), (241.0, 238.0, 244.0)


@pytest.fixture(scope="module")
def maps() -> dict[str, ColorMap]:
    src = load_he("source").reshape(-1, 3)
    tgt = load_he("target").reshape(-1, 3)
    out = {m: compile_colormap(m, fit_stats(m, src, FAST), fit_stats(m, tgt, FAST), source_white=SRC_WHITE,
                               target_white=TGT_WHITE) for m in METHODS}
    out["none"] = compile_colormap("none")
    out["keep"] = compile_colormap("reinhard", fit_stats("reinhard", src), fit_stats("reinhard", tgt),
                                   source_white=SRC_WHITE, target_white=TGT_WHITE, glass="keep")
    out["keep-macenko"] = compile_colormap("macenko", fit_stats("macenko", src, FAST), fit_stats("macenko", tgt, FAST),
                                           source_white=SRC_WHITE, target_white=TGT_WHITE, glass="keep")
    return out


@pytest.fixture(scope="module")
def probe() -> NDArray[np.uint8]:
    rng = np.random.default_rng(0)
    real = load_he("source")[:128, :128]
    rand = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    extremes = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 0, 255]] * 32], dtype=np.uint8)
    return np.concatenate([real, rand, extremes], axis=0)


@pytest.mark.parametrize("method", METHODS + ("none", "keep"))
def test_lut_is_bit_identical_to_numpy(maps: dict[str, ColorMap], probe: NDArray[np.uint8], method: str) -> None:
    cmap = maps[method]
    assert np.array_equal(cmap.apply(probe), cmap.evaluate_numpy(probe))
    # a slice of the whole table, against direct evaluation of the same colours
    lut = cmap.lut()
    r = 97
    block = np.stack(np.meshgrid([r], np.arange(256), np.arange(256), indexing="ij"), -1).reshape(-1, 3).astype(np.uint8)
    assert np.array_equal(lut[r].reshape(-1, 3), cmap.evaluate_numpy(block))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "gmm"] + ["keep", "keep-macenko"])
def test_broadcast_built_table_is_per_pixel_evaluation_of_every_colour(maps: dict[str, ColorMap],
                                                                       method: str) -> None:
    # maps that broadcast build their table from (1, 1), (256, 1) and (1, 256) planes; all 256^3
    # entries must equal per-pixel evaluation (float64 element by element, as evaluate_numpy)
    cmap = maps[method]
    assert type(cmap).broadcasts
    packed = cmap._build_packed()
    every = np.indices((256, 256, 256), dtype=np.uint8).reshape(3, -1).T
    assert np.array_equal(packed.reshape(-1, 4)[:, :3], cmap.evaluate_numpy(every))
    assert not packed[..., 3].any()


def test_gather_with_repeated_pixels_is_the_table(maps: dict[str, ColorMap]) -> None:
    # the gather reuses the entry of a pixel equal to the one before it: runs, single changes,
    # one channel changing alone, and black first (the colour its reuse starts from)
    cmap = maps["macenko"]
    rng = np.random.default_rng(3)
    colours = rng.integers(0, 256, (400, 3), dtype=np.uint8)
    colours[0] = 0
    colours[1::7, 1:] = colours[0::7, 1:][: len(colours[1::7])]  # only red differs from the pixel before
    runs = np.repeat(colours, rng.integers(1, 5, len(colours)), axis=0)
    img = np.ascontiguousarray(np.resize(runs, (200 * 200, 3)).reshape(200, 200, 3))
    lut = cmap.lut()
    assert np.array_equal(cmap.apply(img), lut[img[..., 0], img[..., 1], img[..., 2]])


@pytest.mark.parametrize("method", METHODS + ("keep",))
def test_direct_evaluation_over_several_slabs_is_the_table(maps: dict[str, ColorMap], method: str) -> None:
    # evaluate_numpy works in slabs of 2**16 pixels: an image of one full slab and a partial one
    # (real H&E and random colours) gets exactly the table's values, pixel by pixel
    cmap = maps[method]
    rng = np.random.default_rng(7)
    real = np.tile(load_he("source"), (2, 2, 1))[:250, :200]
    img = np.concatenate([real, rng.integers(0, 256, (100, 200, 3), dtype=np.uint8)])  # 70,000 px
    lut = cmap.lut()
    assert np.array_equal(cmap.evaluate_numpy(img), lut[img[..., 0], img[..., 1], img[..., 2]])


@pytest.mark.parametrize("method", METHODS + ("keep",))
def test_distinct_colour_path_is_the_table(maps: dict[str, ColorMap], method: str) -> None:
    # a small slide held in memory maps its distinct colours once each (memo_for_slides maps):
    # real H&E with repeated colours, random colours, a single pixel: the table's values
    cmap = pickle.loads(pickle.dumps(maps[method]))
    rng = np.random.default_rng(11)
    real = np.tile(load_he("target"), (2, 2, 1))[:300, :257]
    img = np.concatenate([real, rng.integers(0, 256, (40, 257, 3), dtype=np.uint8)])
    lut = cmap.lut()
    assert np.array_equal(cmap.evaluate_distinct(img), lut[img[..., 0], img[..., 1], img[..., 2]])
    assert np.array_equal(cmap.evaluate_distinct(img[:1, :1], threads=3), lut[img[:1, :1, 0], img[:1, :1, 1],
                                                                              img[:1, :1, 2]])


@pytest.mark.parametrize("path", ["evaluate_direct", "evaluate_memo"])
@pytest.mark.parametrize("method", METHODS + ("keep",))
def test_direct_and_memo_paths_are_the_table(maps: dict[str, ColorMap], method: str, path: str) -> None:
    # the pipeline's paths without the whole table: evaluate_direct for a slide under 256^3 px,
    # evaluate_memo for a larger one (each distinct colour evaluated once, into a table two
    # threads fill together; gmm uses it for both): the table's values, exactly
    from concurrent.futures import ThreadPoolExecutor

    from wsi_norm.colormap.memo import clear_memos

    clear_memos()  # a memo is shared by every copy of the map in the process: start empty
    cmap = pickle.loads(pickle.dumps(maps[method]))  # a fresh copy: no table, no memo yet
    rng = np.random.default_rng(11)
    real = load_he("source")
    tiles = [real[:120, :120], real[60:260, 40:200], rng.integers(0, 256, (90, 90, 3), dtype=np.uint8),
             real[:120, :120], np.ascontiguousarray(real[::-1][:150])]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(getattr(cmap, path), tiles))
    lut = maps[method].lut()
    for tile, out in zip(tiles, outs, strict=True):
        assert np.array_equal(out, lut[tile[..., 0], tile[..., 1], tile[..., 2]])


@pytest.mark.parametrize("method", ["gmm", "reinhard"])
def test_copies_of_a_map_share_one_memo(maps: dict[str, ColorMap], monkeypatch: pytest.MonkeyPatch,
                                        method: str) -> None:
    # a distributed cluster unpickles a copy of the map for every block of the pyramid; the table of
    # evaluated colours must be one per map and process, not one per copy (each chunk would
    # evaluate all its colours again: gmm took 2.4 GiB and 1.4 x the time on a 268-MP slide)
    from wsi_norm.colormap.memo import clear_memos

    cmap = maps[method]
    assert type(cmap).memo_for_slides
    evaluated: list[int] = []
    plain = type(cmap).evaluate_numpy

    def counted(self: ColorMap, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        evaluated.append(int(np.prod(rgb.shape[:-1])))
        return plain(self, rgb)

    monkeypatch.setattr(type(cmap), "evaluate_numpy", counted)
    clear_memos()
    tile = np.ascontiguousarray(load_he("source")[:120, :160])
    first = pickle.loads(pickle.dumps(cmap)).evaluate_memo(tile)
    assert sum(evaluated) > 1000  # the tile's distinct colours, evaluated once
    evaluated.clear()
    second = pickle.loads(pickle.dumps(cmap)).evaluate_memo(tile)
    assert evaluated == [] and np.array_equal(first, second)
    # another map (another definition: glass kept) has a table of its own
    src, tgt = (fit_stats(method, load_he(name).reshape(-1, 3), FAST) for name in ("source", "target"))
    other = compile_colormap(method, src, tgt, source_white=SRC_WHITE, target_white=TGT_WHITE, glass="keep")
    assert other.cache_key() != cmap.cache_key()
    other.evaluate_memo(tile)
    assert sum(evaluated) > 1000


def test_copies_of_a_map_share_one_device_table(maps: dict[str, ColorMap]) -> None:
    # a GPU worker of a distributed cluster unpickles a copy of the map for every block; the
    # table must reach the device once per map and process (48 MiB), not once per chunk
    cmap = maps["macenko"]
    tile = torch.from_numpy(np.ascontiguousarray(load_he("source")[:64, :64]))
    first, second = (pickle.loads(pickle.dumps(cmap)) for _ in range(2))
    assert first.device_lut("cpu") is second.device_lut("cpu")
    assert torch.equal(second.apply_torch(tile, use_lut=True), torch.from_numpy(cmap.apply(tile.numpy())))
    assert maps["reinhard"].device_lut("cpu") is not first.device_lut("cpu")


def test_memo_waits_for_a_colour_another_thread_is_evaluating(maps: dict[str, ColorMap]) -> None:
    # a tile meets a colour another thread has claimed and not written yet: it gathers the rest,
    # waits, and then gathers only what was missing; every pixel ends with the table's value
    import threading
    import time

    from wsi_norm.colormap.memo import _FILLED, MemoTable

    cmap = maps["reinhard"]
    memo = MemoTable(cmap.evaluate_numpy)
    rng = np.random.default_rng(5)
    tile = np.ascontiguousarray(rng.integers(0, 256, (5000, 3), dtype=np.uint8))
    memo(tile[:10])  # the table exists
    assert memo._table is not None
    pending = tile[1234]
    key = (int(pending[0]) << 16) | (int(pending[1]) << 8) | int(pending[2])
    memo._table[key] = 1 << 25  # claimed by "another thread", not evaluated yet
    result: list[NDArray[np.uint8]] = []
    worker = threading.Thread(target=lambda: result.append(memo(tile)))
    worker.start()
    time.sleep(0.05)
    assert worker.is_alive()  # it waits for the pending colour
    value = cmap.evaluate_numpy(pending[None])[0].astype(np.uint32)
    with memo._cond:
        memo._table[key] = _FILLED | (value[0] << 16) | (value[1] << 8) | value[2]
        memo._cond.notify_all()
    worker.join(5)
    assert not worker.is_alive()
    lut = cmap.lut()
    assert np.array_equal(result[0], lut[tile[:, 0], tile[:, 1], tile[:, 2]])


@pytest.mark.parametrize("method", METHODS + ("keep",))
def test_torch_agrees_with_numpy(maps: dict[str, ColorMap], probe: NDArray[np.uint8], method: str) -> None:
    cmap = maps[method]
    ref = cmap.evaluate_numpy(probe).astype(int)
    f32 = cmap.apply_torch(torch.from_numpy(probe)).numpy().astype(int)
    f64 = cmap.apply_torch(torch.from_numpy(probe), dtype=torch.float64).numpy().astype(int)
    lut = cmap.apply_torch(torch.from_numpy(probe), use_lut=True).numpy().astype(int)
    assert np.abs(f32 - ref).max() <= 1
    assert np.abs(f64 - ref).max() <= 1
    assert (f64 != ref).mean() < 1e-3
    assert np.array_equal(lut, ref)


@pytest.mark.parametrize("method", METHODS)
def test_glass_goes_to_the_target_white_and_tissue_changes(maps: dict[str, ColorMap], probe: NDArray[np.uint8], method: str) -> None:
    glass = np.array([[SRC_WHITE]], dtype=np.uint8)
    assert np.abs(maps[method].apply(glass).astype(int) - np.array(TGT_WHITE)).max() <= 1
    out = maps[method].apply(probe)
    assert np.any(out != probe)
    assert out.dtype == np.uint8 and out.shape == probe.shape


def test_keep_glass_keeps_it_and_blends_smoothly(maps: dict[str, ColorMap]) -> None:
    cmap = maps["keep"]
    glass = np.array([[SRC_WHITE]], dtype=np.uint8)
    assert np.array_equal(cmap.apply(glass), glass)
    # along a ramp from tissue into glass the output never jumps
    ramp = np.linspace([150, 140, 170], SRC_WHITE, 400).round().astype(np.uint8)[None]
    steps = np.abs(np.diff(cmap.apply(ramp)[0].astype(int), axis=0)).max()
    assert steps <= 3


def test_glass_blend_band_and_validation() -> None:
    blend = GlassBlend.for_whites("target", (250.0, 250.0, 250.0), (240.0, 240.0, 240.0))
    assert blend.lo == 226.0 and blend.hi == 244.0
    dim = GlassBlend.for_whites("keep", (205.0, 205.0, 205.0))
    assert dim.lo == 200.0 and dim.hi == 208.0
    with pytest.raises(ValueError, match="glass mode"):
        GlassBlend("sideways", (240.0,) * 3, (240.0,) * 3, 200.0, 220.0)  # type: ignore[arg-type]  # invalid on purpose
    with pytest.raises(ValueError, match="glass band"):
        GlassBlend("keep", (240.0,) * 3, (240.0,) * 3, 190.0, 220.0)


@pytest.mark.parametrize("method", METHODS)
def test_black_maps_to_finite_not_all_black(maps: dict[str, ColorMap], method: str) -> None:
    black = np.zeros((4, 4, 3), np.uint8)
    out = maps[method].evaluate_numpy(black)
    assert out.dtype == np.uint8
    tile = maps[method].apply(load_he("source"))
    assert tile.reshape(-1, 3).max(axis=0).min() > 100  # not an all-black result


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_whole_tile_equals_subtiles(maps: dict[str, ColorMap], method: str) -> None:
    img = load_he("source")[:300, :301]
    cmap = maps[method]
    whole = cmap.apply(img)
    parts = np.concatenate(
        [np.concatenate([cmap.apply(img[y:y + 128, x:x + 97]) for x in range(0, 301, 97)], axis=1)
         for y in range(0, 300, 128)], axis=0)
    assert np.array_equal(whole, parts)


def test_pickle_is_small_before_lut_and_equal_after(maps: dict[str, ColorMap], probe: NDArray[np.uint8]) -> None:
    cmap = maps["macenko"]
    cmap.lut()
    blob = pickle.dumps(cmap)
    assert len(blob) < 2000
    clone = pickle.loads(blob)
    assert clone._lut is None
    assert np.array_equal(clone.apply(probe), cmap.apply(probe))


def test_singular_stain_matrix_raises() -> None:
    good = MacenkoStats(stain_matrix=np.array([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0]]), max_conc=np.array([1.0, 1.0]))
    v = np.array([0.6, 0.7, 0.3]) / np.linalg.norm([0.6, 0.7, 0.3])
    w = np.array([0.6, 0.7, 0.36]) / np.linalg.norm([0.6, 0.7, 0.36])  # 3.3 deg from v
    near = MacenkoStats(stain_matrix=np.stack([v, w]), max_conc=np.array([1.0, 1.0]))
    with pytest.raises(FitError, match="only 3.[0-9]+ deg apart"):
        compile_colormap("macenko", near, good)
    with pytest.raises(FitError, match="deg apart"):
        compile_colormap("macenko", good, near)
    # under a degree (or opposite) the matrix is singular: such stats cannot even be made, so a
    # template holding them is refused as a template, not blamed on the slide being mapped
    for u in (np.array([0.6, 0.7, 0.31]) / np.linalg.norm([0.6, 0.7, 0.31]), -v):
        with pytest.raises(ValueError, match="deg apart \\(parallel\\)"):
            MacenkoStats(stain_matrix=np.stack([v, u]), max_conc=np.array([1.0, 1.0]))


def test_wrong_stats_type_and_method() -> None:
    good = MacenkoStats(stain_matrix=np.array([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0]]), max_conc=np.array([1.0, 1.0]))
    with pytest.raises(TypeError, match="expected ReinhardStats"):
        compile_colormap("reinhard", good, good)
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        compile_colormap("foo", good, good)


_M = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
_M = _M / np.linalg.norm(_M, axis=1, keepdims=True)


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3))))
def test_dtype_and_shape_preserved(rgb: NDArray[np.uint8]) -> None:
    cmap = compile_colormap("macenko", MacenkoStats(stain_matrix=_M, max_conc=np.array([1.5, 1.0])),
                            MacenkoStats(stain_matrix=_M, max_conc=np.array([1.0, 0.8])))
    out = cmap.evaluate_numpy(rgb)
    assert out.dtype == np.uint8 and out.shape == rgb.shape


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (50, 2), elements=st.floats(0.0, 2.0)))
def test_self_map_is_identity_on_stain_plane(conc: NDArray[np.float64]) -> None:
    from wsi_norm.color import od_to_rgb

    white = (236.0, 243.0, 249.0)
    rgb = np.clip(np.rint(od_to_rgb(conc @ _M, white=white)), 0, 255).astype(np.uint8)
    stats = MacenkoStats(stain_matrix=_M, max_conc=np.array([1.5, 1.0]))
    out = compile_colormap("macenko", stats, stats, source_white=white, target_white=white).evaluate_numpy(rgb)
    assert np.abs(out.astype(int) - rgb).max() <= 2


def _by_exponential_of_the_sum(cmap: ColorMap, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """The stain map as the exponential of the mapped optical density (its definition before
    the exponential was taken per input channel), rounded as the table is."""
    from wsi_norm.colormap.maps import planar_intensity, planar_od

    planes = [rgb[:, c].astype(np.float64) for c in range(3)]
    od = planar_od(np, (planes[0], planes[1], planes[2]), cmap.source_white)  # type: ignore[attr-defined]
    m = cmap.matrix  # type: ignore[attr-defined]
    mapped = [od[0] * float(m[0, j]) + od[1] * float(m[1, j]) + od[2] * float(m[2, j]) for j in range(3)]
    out = planar_intensity(np, mapped, cmap.target_white)  # type: ignore[attr-defined]
    return np.stack([np.clip(np.rint(c), 0, 255) for c in out], axis=1).astype(np.uint8)


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_factorized_exponential_is_the_exponential_of_the_sum(maps: dict[str, ColorMap], method: str) -> None:
    # the table takes exp per input channel and multiplies; over the whole cube it must write
    # what exp of the sum writes (a few ulps apart: at most a handful of entries on a .5
    # boundary may round the other way, by one level)
    cmap = maps[method]
    assert cmap.factorized  # type: ignore[attr-defined]
    every = np.indices((256, 256, 256), dtype=np.uint8).reshape(3, -1).T
    table = cmap.lut().reshape(-1, 3)
    diff = np.abs(table.astype(np.int16) - _by_exponential_of_the_sum(cmap, every).astype(np.int16))
    assert diff.max() <= 1 and int((diff > 0).sum()) <= 16, (diff.max(), int((diff > 0).sum()))


def test_an_extreme_map_takes_the_exponential_of_the_sum() -> None:
    # stains 6 deg apart and a 50x concentration ratio: products of per-channel exponentials
    # could overflow, so the map keeps exp of the sum, and its table is still its evaluation
    from wsi_norm.colormap.maps import StainMatrixMap

    h = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
    axis = np.cross(h, [0.0, 0.0, 1.0])
    axis /= np.linalg.norm(axis)
    angle = np.radians(6.0)
    e = h * np.cos(angle) + np.cross(axis, h) * np.sin(angle)
    src = np.stack([h, e])
    from wsi_norm.stain.base import RUIFROK_HE

    target = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)
    cmap = StainMatrixMap(src, np.array([0.2, 0.2]), target, np.array([10.0, 10.0]))
    assert not cmap.factorized
    every = np.indices((256, 256, 256), dtype=np.uint8).reshape(3, -1).T
    packed = cmap._build_packed().reshape(-1, 4)[:, :3]
    assert np.array_equal(packed, cmap.evaluate_numpy(every))
    assert np.array_equal(packed, _by_exponential_of_the_sum(cmap, every))
