"""A lookup table filled on demand: each distinct colour of the tiles evaluated once.

An image of fewer than 256^3 pixels is evaluated directly rather than through the map's
whole table (:meth:`wsi_norm.colormap.maps.ColorMap.lut`), but an H&E tile repeats its colours
(CMU-1-Small-Region: 6.6 MP, 0.95 M distinct colours; a 1024^2 chunk holds about 0.1 M). A
:class:`MemoTable` keeps one ``uint32`` per colour of the cube (64 MiB): 0 for "not evaluated",
else the mapped colour packed with a "filled" bit. A tile's colours not yet in the table are
evaluated by the map's own :meth:`~wsi_norm.colormap.maps.ColorMap.evaluate_numpy` (so each
entry is the one the full table would hold: the output is bit-identical) and written in; then
the tile is gathered.

Threads: claiming a tile's missing colours runs under a lock and marks them "pending", so a
colour is evaluated by one thread only; the evaluation runs outside the lock; the results are
written under it. A gather that meets a colour another thread is still evaluating waits for it.
Every entry is one aligned 32-bit word, written whole, so a reader sees either "pending" or the
final value.

Copies: on a ``distributed`` cluster, every task submitted with its own pickled graph (the
pyramid submits one per block of level 0) unpickles its own copy of the map, even on an
in-process worker, so a table held by one copy would be refilled from nothing for every block.
:func:`shared_memo` keeps one table per map definition
(:meth:`wsi_norm.colormap.maps.ColorMap.cache_key`) in each process, as the whole tables are kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["MemoTable", "clear_memos", "shared_memo"]

_FILLED = np.uint32(1 << 24)

_KERNELS: dict[str, Any] = {}


def _kernels() -> dict[str, Any]:
    """Compile (once, lazily) the numba claim and gather loops."""
    if not _KERNELS:
        import numba

        @numba.njit(nogil=True, cache=True)
        def claim(pixels: Any, table: Any, missing: Any) -> int:  # pragma: no cover - compiled
            n = 0
            for i in range(pixels.shape[0]):
                key = (np.uint32(pixels[i, 0]) << 16) | (np.uint32(pixels[i, 1]) << 8) | np.uint32(pixels[i, 2])
                if table[key] == 0:
                    table[key] = 1 << 25
                    missing[n] = key
                    n += 1
            return n

        @numba.njit(nogil=True, cache=True)
        def gather_or_miss(pixels: Any, table: Any, out: Any, missed: Any) -> int:  # pragma: no cover - compiled
            n = 0
            for i in range(pixels.shape[0]):
                key = (np.uint32(pixels[i, 0]) << 16) | (np.uint32(pixels[i, 1]) << 8) | np.uint32(pixels[i, 2])
                v = table[key]
                if (v & (1 << 24)) == 0:
                    missed[n] = i
                    n += 1
                else:
                    out[i, 0] = (v >> 16) & 255
                    out[i, 1] = (v >> 8) & 255
                    out[i, 2] = v & 255
            return n

        _KERNELS["claim"] = claim
        _KERNELS["gather_or_miss"] = gather_or_miss
    return _KERNELS


class MemoTable:
    """The colour map's table, filled with the colours met so far.

    Parameters
    ----------
    evaluate : callable, ``(N, 3) uint8 -> (N, 3) uint8``
        The exact map (a map's ``evaluate_numpy``).
    """

    def __init__(self, evaluate: Callable[[NDArray[np.uint8]], NDArray[np.uint8]]) -> None:
        self._evaluate = evaluate
        self._table: NDArray[np.uint32] | None = None
        self._cond = threading.Condition()

    def __call__(self, flat: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Map ``(N, 3) uint8`` C-contiguous pixels; bit-identical to ``evaluate(flat)``.

        Once the table exists, one pass gathers every pixel whose colour is filled and lists the
        others (no lock: each entry is one 32-bit word, written whole); only those go through
        claim, evaluation and a second gather. A chunk of a large slide whose colours are all
        known is then one pass over its pixels, as a gather from the whole table is.
        """
        kernels = _kernels()
        table = self._table
        if table is None:
            return self._fill_and_gather(flat, kernels)
        out = np.empty_like(flat)
        missed = np.empty(len(flat), dtype=np.intp)
        n = kernels["gather_or_miss"](flat, table, out, missed)
        if n:
            rest = missed[:n]
            out[rest] = self._fill_and_gather(np.ascontiguousarray(flat[rest]), kernels)
        return out

    def _fill_and_gather(self, flat: NDArray[np.uint8], kernels: dict[str, Any]) -> NDArray[np.uint8]:
        """Claim and evaluate the colours of ``flat`` not in the table yet, then gather; waits
        for colours another thread is still evaluating, and goes on with those pixels only (a
        retry over the whole tile had claimed and gathered ~5 x the slide's pixels)."""
        out = np.empty_like(flat)
        todo, at = flat, None  # the pixels not gathered yet, and where they go in out (None: all)
        while True:
            self._fill(todo, kernels["claim"])
            got = out if at is None else np.empty_like(todo)
            missed = np.empty(len(todo), dtype=np.intp)
            n = kernels["gather_or_miss"](todo, self._table, got, missed)
            if at is not None:
                out[at] = got  # the rows still missed are written again below
            if n == 0:
                return out
            rest = missed[:n]
            at = rest if at is None else at[rest]
            todo = np.ascontiguousarray(todo[rest])
            with self._cond:  # a colour another thread is still evaluating
                self._cond.wait(timeout=0.01)

    def _fill(self, flat: NDArray[np.uint8], claim: Any) -> None:
        """Evaluate and write in the colours of ``flat`` that no thread has claimed yet."""
        with self._cond:
            if self._table is None:
                self._table = np.zeros(1 << 24, dtype=np.uint32)
            table = self._table
            missing = np.empty(len(flat), dtype=np.uint32)
            missing = missing[: claim(flat, table, missing)].copy()
        if not len(missing):
            return
        try:
            colours = np.stack([(missing >> 16) & 255, (missing >> 8) & 255, missing & 255], axis=1).astype(np.uint8)
            mapped = self._evaluate(colours).astype(np.uint32)
            packed = _FILLED | (mapped[:, 0] << 16) | (mapped[:, 1] << 8) | mapped[:, 2]
        except BaseException:
            with self._cond:  # give the colours back: a waiting thread claims them again
                table[missing] = 0
                self._cond.notify_all()
            raise
        with self._cond:
            table[missing] = packed
            self._cond.notify_all()


# one table per map definition in this process (64 MiB once used), the most recent two
_MEMOS: OrderedDict[str, MemoTable] = OrderedDict()
_MEMOS_LOCK = threading.Lock()
_MEMOS_SIZE = 2  # two slides at a time in a flow; a memo refills cheaply (only a slide's colours)


def shared_memo(key: str, evaluate: Callable[[NDArray[np.uint8]], NDArray[np.uint8]]) -> MemoTable:
    """This process's :class:`MemoTable` for the map whose definition hashes to ``key``.

    Every copy of one map (the same ``key``: a distributed cluster unpickles one per block of
    the pyramid) shares it, so each distinct colour is evaluated once per process, not once per
    block. The two most recent maps' tables are kept.

    Parameters
    ----------
    key : str
        :meth:`wsi_norm.colormap.maps.ColorMap.cache_key` of the map.
    evaluate : callable, ``(N, 3) uint8 -> (N, 3) uint8``
        The map's exact evaluation; used when ``key`` has no table yet (the copies of one map
        evaluate alike).
    """
    with _MEMOS_LOCK:
        memo = _MEMOS.get(key)
        if memo is None:
            memo = _MEMOS[key] = MemoTable(evaluate)
            while len(_MEMOS) > _MEMOS_SIZE:
                _MEMOS.popitem(last=False)
        else:
            _MEMOS.move_to_end(key)
        return memo


def clear_memos() -> None:
    """Drop this process's shared tables (maps that hold one keep it until they are dropped)."""
    with _MEMOS_LOCK:
        _MEMOS.clear()
