"""Train a StainNet colour map from pixel pairs (source colour -> target colour).

Training pairs come either from a *teacher* colour map (for example the slide-wide Macenko
map from a source slide to a target template) applied to tissue pixels sampled over many
slides -- :func:`pairs_from_teacher` -- or from registered image pairs.  StainNet is a
function of one pixel, so training needs pixels, not images: this module takes
``(N, 3) uint8`` arrays and does no slide I/O.

Speed: identical (source, target) pairs are merged and weighted by their count, and the
1,283-parameter network is trained with big batches of ``(P, 3)`` matrix products, so a few
million pixels train in well under a minute per epoch budget on one CPU core.

Determinism: on CPU a run is a function of its inputs and ``seed`` (the validation split,
the initial weights and the batch order are all seeded, and
``torch.use_deterministic_algorithms`` is on for the duration); the global RNG state of
torch is restored afterwards.  On CUDA set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` for the same.

References
----------
Kang H, Luo D, Feng W, et al. "StainNet: A Fast and Robust Stain Normalization Network."
Frontiers in Medicine 8 (2021): 746307. doi:10.3389/fmed.2021.746307 (L1 loss, SGD with
momentum and cosine annealing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_norm.colormap.stainnet import (
    StainNetMetadata,
    StainNetWeights,
    _package_version,
    _stainnet_class,
    network_pixels,
)

if TYPE_CHECKING:
    import torch

__all__ = ["EpochRecord", "TrainResult", "pairs_from_teacher", "train_stainnet"]

log = logging.getLogger(__name__)

Optimizer = Literal["adam", "sgd"]
TeacherMap = Callable[[NDArray[np.uint8]], NDArray[np.uint8]]


@dataclass(frozen=True)
class EpochRecord:
    """Losses after one training epoch.

    Attributes
    ----------
    epoch : int
        1-based epoch number.
    train_loss : float
        Count-weighted mean L1 loss over the epoch's batches, in the network's output units
        ([-1, 1] scale: multiply by 127.5 for grey levels).
    val_loss : float
        Count-weighted mean L1 loss on the held-out pixels (same units); NaN without a
        validation split.
    lr : float
        Learning rate at the end of the epoch.
    seconds : float
        Wall time of the epoch, validation included.
    """

    epoch: int
    train_loss: float
    val_loss: float
    lr: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_stainnet`.

    Attributes
    ----------
    model : StainNetWeights
        Trained weights (their ``metadata`` equals :attr:`metadata`).
    history : tuple of EpochRecord
        One record per epoch.
    val_loss : float
        Held-out L1 loss after the last epoch (network units; NaN without validation).
    metadata : StainNetMetadata
        What to store with the weights (:func:`~wsi_norm.colormap.stainnet.save_stainnet`).
    """

    model: StainNetWeights
    history: tuple[EpochRecord, ...]
    val_loss: float
    metadata: StainNetMetadata


def pairs_from_teacher(
    pixels: NDArray[np.uint8], teacher_map: TeacherMap, *, chunk_px: int = 1 << 20
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """Training pairs from a teacher colour map applied to sampled pixels.

    Parameters
    ----------
    pixels : (N, 3) uint8
        Source pixels (typically tissue pixels sampled over many slides).
    teacher_map : callable, (H, W, 3) uint8 -> (H, W, 3) uint8
        Any per-pixel colour map, e.g. the ``apply`` method of a fitted Macenko map.  It is
        called on ``(1, n, 3)`` views of at most ``chunk_px`` pixels.
    chunk_px : int, keyword-only
        Pixels per teacher call (bounds the teacher's memory use).

    Returns
    -------
    inputs : (N, 3) uint8
        ``pixels`` (the same array).
    targets : (N, 3) uint8
        The teacher's colours.

    Raises
    ------
    TypeError, ValueError
        Wrong dtype or shape of ``pixels`` or of the teacher's output.
    """
    inputs = _check_pixels(pixels, "pixels")
    if chunk_px < 1:
        raise ValueError(f"chunk_px must be >= 1, got {chunk_px}")
    targets = np.empty_like(inputs)
    for start in range(0, inputs.shape[0], chunk_px):
        chunk = inputs[start : start + chunk_px]
        mapped = np.asarray(teacher_map(chunk[np.newaxis]))
        if mapped.dtype != np.uint8 or mapped.shape != (1, *chunk.shape):
            raise ValueError(
                f"teacher_map must return uint8 of shape {(1, *chunk.shape)}, "
                f"got {mapped.dtype} {mapped.shape}"
            )
        targets[start : start + chunk.shape[0]] = mapped[0]
    return inputs, targets


def _check_pixels(pixels: NDArray[np.uint8], name: str) -> NDArray[np.uint8]:
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8, got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {arr.shape}")
    return arr


def _merge_pairs(
    inputs: NDArray[np.uint8], targets: NDArray[np.uint8]
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], NDArray[np.float32]]:
    """Unique (input, target) colour pairs and their counts (as float32 weights)."""
    packed_in = (
        (inputs[:, 0].astype(np.uint64) << 16)
        | (inputs[:, 1].astype(np.uint64) << 8)
        | inputs[:, 2]
    )
    packed_out = (
        (targets[:, 0].astype(np.uint64) << 16)
        | (targets[:, 1].astype(np.uint64) << 8)
        | targets[:, 2]
    )
    keys, counts = np.unique((packed_in << 24) | packed_out, return_counts=True)
    shifts = np.array([40, 32, 24, 16, 8, 0], dtype=np.uint64)
    channels = ((keys[:, None] >> shifts) & np.uint64(255)).astype(np.uint8)
    return channels[:, :3], channels[:, 3:], counts.astype(np.float32)


@contextlib.contextmanager
def _deterministic(seed: int, device: torch.device, cpu_threads: int | None) -> Iterator[None]:
    """Seed torch's CPU RNG, turn on deterministic algorithms, set CPU threads; restore after."""
    import torch

    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
        if cpu_threads is not None and device.type == "cpu":
            torch.set_num_threads(cpu_threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
            torch.set_num_threads(was_threads)


def _scaled(rgb: NDArray[np.uint8], device: torch.device) -> torch.Tensor:
    """uint8 (P, 3) -> float32 tensor in [-1, 1] (StainNet's input and target scaling)."""
    import torch

    return (
        torch.from_numpy(np.ascontiguousarray(rgb)).to(device).to(torch.float32) * (2.0 / 255.0)
        - 1.0
    )


def train_stainnet(
    inputs: NDArray[np.uint8],
    targets: NDArray[np.uint8],
    *,
    epochs: int = 40,
    batch_size: int = 16384,
    lr: float | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    optimizer: Optimizer = "adam",
    device: str = "cpu",
    progress: Callable[[EpochRecord], None] | None = None,
    metadata: StainNetMetadata | None = None,
    init: StainNetWeights | None = None,
    cpu_threads: int | None = 1,
) -> TrainResult:
    """Fit StainNet to map ``inputs`` to ``targets`` (L1 loss, cosine-annealed learning rate).

    Parameters
    ----------
    inputs, targets : (N, 3) uint8
        Paired source and target colours (e.g. from :func:`pairs_from_teacher`).
    epochs : int, keyword-only
        Passes over the (merged) training pairs.  Duplicates are merged, so what matters is
        the number of optimizer steps, ``epochs * ceil(distinct pairs / batch_size)``: aim
        for a few thousand (a warning is logged below 500).
    batch_size : int, keyword-only
        Distinct colour pairs per optimizer step.
    lr : float, optional, keyword-only
        Initial learning rate; default 0.01 for both optimizers (the paper's SGD value).
        It decays to 0 along a cosine over all steps.
    seed : int, keyword-only
        Seeds the validation split, the initial weights and the batch order.
    val_fraction : float in [0, 1), keyword-only
        Share of the *pixels* held out before merging duplicates (so held-out colours are
        weighted as they occur).
    optimizer : {"adam", "sgd"}, keyword-only
        ``"sgd"``: momentum 0.9, as in the paper.  ``"adam"`` (default) reached a lower
        held-out loss in the same number of epochs in this project's measurements.
    device : str, keyword-only
        torch device ("cpu", "cuda", ...).
    progress : callable, optional, keyword-only
        Called with an :class:`EpochRecord` after every epoch (also logged at INFO).
    metadata : StainNetMetadata, optional, keyword-only
        Descriptive fields (teacher, target template, training data); the training fields
        (epochs, losses, seed, optimizer, version) are filled in.
    init : StainNetWeights, optional, keyword-only
        Start from these weights (fine-tuning) instead of a seeded random initialisation.
    cpu_threads : int or None, keyword-only
        torch intra-op threads while training on CPU (``torch.set_num_threads``, process-wide,
        restored afterwards); ``None`` keeps torch's setting.  Default 1: the model is so
        small that more threads only add synchronisation, and on a busy 2-core machine
        2 threads were 50x slower than 1 (measured).

    Returns
    -------
    TrainResult

    Raises
    ------
    TypeError, ValueError
        Bad shapes, dtypes or options.
    """
    import torch

    x_all = _check_pixels(inputs, "inputs")
    t_all = _check_pixels(targets, "targets")
    if x_all.shape != t_all.shape:
        raise ValueError(
            f"inputs and targets must have the same shape, got {x_all.shape} and {t_all.shape}"
        )
    if x_all.shape[0] < 2:
        raise ValueError(f"need at least 2 pixel pairs, got {x_all.shape[0]}")
    if cpu_threads is not None and cpu_threads < 1:
        raise ValueError(f"cpu_threads must be >= 1 or None, got {cpu_threads}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    lr = 0.01 if lr is None else float(lr)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    dev = torch.device(device)

    order = np.random.default_rng(seed).permutation(x_all.shape[0])
    n_val = round(val_fraction * x_all.shape[0])
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_in, train_out, train_w = _merge_pairs(x_all[train_idx], t_all[train_idx])
    log.info(
        "StainNet training: %d pixels -> %d distinct training pairs, %d held out; %s, %d epochs",
        x_all.shape[0],
        train_in.shape[0],
        n_val,
        optimizer,
        epochs,
    )

    with _deterministic(seed, dev, cpu_threads):
        module: Any = init.to_module() if init is not None else _stainnet_class()()
        module = module.to(dev).train()
        x_train, t_train = _scaled(train_in, dev), _scaled(train_out, dev)
        w_train = torch.from_numpy(train_w).to(dev)
        if n_val:
            val_in, val_out, val_w = _merge_pairs(x_all[val_idx], t_all[val_idx])
            x_val, t_val, w_val = (
                _scaled(val_in, dev),
                _scaled(val_out, dev),
                torch.from_numpy(val_w).to(dev),
            )

        params = list(module.parameters())
        opt: torch.optim.Optimizer
        if optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
        if epochs * steps_per_epoch < 500:
            log.warning(
                "StainNet training: only %d optimizer steps "
                "(%d distinct pairs / batch %d x %d epochs); "
                "a smaller batch_size or more epochs usually helps",
                epochs * steps_per_epoch,
                x_train.shape[0],
                batch_size,
                epochs,
            )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        shuffle = torch.Generator().manual_seed(seed)

        history: list[EpochRecord] = []
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            perm = torch.randperm(x_train.shape[0], generator=shuffle).to(dev)
            loss_sum = torch.zeros((), device=dev)
            for first in range(0, x_train.shape[0], batch_size):
                idx = perm[first : first + batch_size]
                weight = w_train[idx]
                err = (network_pixels(module, x_train[idx]) - t_train[idx]).abs().mean(dim=1)
                batch_loss = (err * weight).sum()
                opt.zero_grad(set_to_none=True)
                (batch_loss / weight.sum()).backward()  # type: ignore[no-untyped-call]  # torch: unannotated
                opt.step()
                schedule.step()
                loss_sum += batch_loss.detach()
            train_loss = float(loss_sum) / float(train_w.sum())
            val_loss = math.nan
            if n_val:
                with torch.no_grad():
                    err = (network_pixels(module, x_val) - t_val).abs().mean(dim=1)
                    val_loss = float((err * w_val).sum() / w_val.sum())
            record = EpochRecord(
                epoch=epoch,
                train_loss=train_loss,
                val_loss=val_loss,
                lr=float(opt.param_groups[0]["lr"]),
                seconds=time.perf_counter() - start,
            )
            history.append(record)
            log.info(
                "epoch %d/%d: train L1 %.5f, held-out L1 %.5f (%.2f grey levels), %.2f s",
                epoch,
                epochs,
                train_loss,
                val_loss,
                val_loss * 127.5,
                record.seconds,
            )
            if progress is not None:
                progress(record)

    meta = dataclasses.replace(
        metadata or StainNetMetadata(),
        epochs=epochs,
        final_loss=history[-1].train_loss,
        val_loss=None if math.isnan(history[-1].val_loss) else history[-1].val_loss,
        seed=seed,
        optimizer=f"{optimizer} lr={lr:g} cosine batch={batch_size}",
        wsi_norm_version=_package_version(),
    )
    weights = StainNetWeights.from_module(module, metadata=meta)
    return TrainResult(
        model=weights, history=tuple(history), val_loss=history[-1].val_loss, metadata=meta
    )
