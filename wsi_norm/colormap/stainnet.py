"""StainNet: a per-pixel colour-mapping network, its weights files and its colour map.

StainNet (Kang et al. 2021) is a fully 1x1-convolutional network::

    Conv1x1(3 -> 32) . ReLU . Conv1x1(32 -> 32) . ReLU . Conv1x1(32 -> 3)      (1,283 parameters)

applied to RGB scaled to [-1, 1]; its output is scaled back, clamped to [0, 1], multiplied by
255 and truncated to uint8.  Every output pixel is a function of the input pixel alone, so the
network is one more per-pixel colour map (like a fitted Macenko map) and compiles to an exact
256^3 lookup table.

What this module holds
----------------------
* :class:`StainNetWeights`: the six weight arrays (numpy, float32) and a
  :class:`StainNetMetadata` record; pure data, picklable, no torch needed.
* :func:`load_stainnet` / :func:`save_stainnet`: published PyTorch checkpoints (``.pth``) and
  wsi-norm's own ``.safetensors`` files with their metadata in the safetensors header.
* :class:`StainNetMap`: the colour map, a :class:`wsi_norm.colormap.ColorMap` (the published
  module's own arithmetic, a numpy reference, 256^3 LUT); :func:`load_stainnet_map` loads one
  from a file.
* ``StainNet``: the :class:`torch.nn.Module` (attribute ``rgb_trans``, so published state dicts
  load with ``strict=True``).  torch takes seconds to import, so the class is created on first
  access (``from wsi_norm.colormap.stainnet import StainNet`` works as usual and imports torch).

Evaluation paths and how exactly they agree
-------------------------------------------
* ``apply`` (CPU): the published model's own arithmetic: the ``StainNet`` module (three 1x1
  ``Conv2d``) in float32 on ``(1, 3, 1, 65536)`` slabs of pixels, ``(rgb / 255 - 0.5) * 2`` in,
  ``clip(y * 0.5 + 0.5, 0, 1) * 255`` truncated to uint8 out, exactly as the authors' code; or a
  gather from the 256^3 LUT, built from the very same slabs, so the two are **bit-identical**.
  On the torchstain patches through the three published checkpoints this equals the authors'
  computation on the whole image on every pixel (``tests/integration/test_colour_fidelity.py``). (An earlier
  compiled per-pixel loop summed in another order and moved 2-16 pixels per patch by one level.)
* ``evaluate_numpy``: the definition the others are pinned to (the module on slabs, via
  :func:`network_colour`); the tests check it against an independent numpy reference of the
  paper's arithmetic (within one grey level: float32 summation order).
* ``apply_torch``: on CUDA the default is the gather from the same (CPU-built) LUT, so GPU and
  CPU workers produce bit-identical slides; ``use_lut=False`` runs the module on the tensor's
  device (within one grey level of the others).

Glass
-----
StainNet maps every pixel, glass included, exactly as the published models do (the network was
trained on both scanners' glass, so it also carries the white point across).  ``--keep-glass``
(``StainNetMap(glass=GlassBlend(mode="keep", ...))``) keeps the source's glass instead, blended
smoothly into the network's colour over a band of luma (:class:`wsi_norm.colormap.GlassBlend`);
the blend acts on the network's truncated 8-bit colour and is rounded, identically on every path.

Thread safety: :class:`StainNetMap` may be shared by threads (dask workers); the LUT is built
once under a lock.  Loading and saving touch only the named file.

References
----------
Kang H, Luo D, Feng W, et al. "StainNet: A Fast and Robust Stain Normalization Network."
Frontiers in Medicine 8 (2021): 746307. doi:10.3389/fmed.2021.746307
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import numpy as np
from numpy.typing import NDArray

from wsi_norm.color import _check_rgb_uint8 as _check_rgb
from wsi_norm.colormap.maps import ColorMap, GlassBlend
from wsi_norm.errors import OutputError, OutputExistsError, WeightsError

if TYPE_CHECKING:
    import torch

__all__ = [
    "HIDDEN_CHANNELS",
    "N_PARAMETERS",
    "StainNet",
    "StainNetMap",
    "StainNetMetadata",
    "StainNetWeights",
    "load_stainnet",
    "load_stainnet_map",
    "save_stainnet",
]

HIDDEN_CHANNELS = 32
"""Width of the two hidden layers of the published StainNet models."""

N_PARAMETERS = (
    3 * HIDDEN_CHANNELS
    + HIDDEN_CHANNELS
    + HIDDEN_CHANNELS**2
    + HIDDEN_CHANNELS
    + HIDDEN_CHANNELS * 3
    + 3
)
"""1,283: the parameter count of StainNet."""

FORMAT_NAME = "wsi-norm-stainnet"
FORMAT_VERSION = "1"

# state-dict key -> (attribute of StainNetWeights, shape in the checkpoint)
_STATE_KEYS: dict[str, tuple[str, tuple[int, ...]]] = {
    "rgb_trans.0.weight": ("conv0_weight", (HIDDEN_CHANNELS, 3, 1, 1)),
    "rgb_trans.0.bias": ("conv0_bias", (HIDDEN_CHANNELS,)),
    "rgb_trans.2.weight": ("conv1_weight", (HIDDEN_CHANNELS, HIDDEN_CHANNELS, 1, 1)),
    "rgb_trans.2.bias": ("conv1_bias", (HIDDEN_CHANNELS,)),
    "rgb_trans.4.weight": ("conv2_weight", (3, HIDDEN_CHANNELS, 1, 1)),
    "rgb_trans.4.bias": ("conv2_bias", (3,)),
}

_LUT_SIZE = 256**3
_LUT_BYTES = _LUT_SIZE * 3
_TORCH_CHUNK_PX = 1 << 22
#: Pixels per module call: every evaluation (direct, LUT, any tile size) uses this one layout.
_SLAB_PX = 1 << 16

Method = Literal["auto", "direct", "lut"]

StainNet: Any  # the torch module class, created on first access by __getattr__ (imports torch)


# --------------------------------------------------------------------------- metadata, weights


@dataclass(frozen=True)
class StainNetMetadata:
    """What is known about how a StainNet model was made (stored with its weights).

    Parameters
    ----------
    teacher : str
        Colour map that produced the training targets (e.g. ``"macenko"``), or how the targets
        were obtained (``"registered pairs"``); empty when unknown.
    target_template : str
        Summary of the target appearance (template name, file hash or its JSON); empty if unknown.
    training_data : str
        Description of the training pixels (slides, counts, sampling seed).
    epochs : int
        Training epochs (0: unknown, e.g. a published checkpoint).
    final_loss : float or None
        Training L1 loss of the last epoch, in the network's output units ([-1, 1] scale;
        multiply by 127.5 for grey levels); None if unknown.
    val_loss : float or None
        Held-out L1 loss of the last epoch, same units; None if unknown.
    seed : int or None
        Seed of the training run.
    optimizer : str
        Optimizer and schedule, e.g. ``"adam lr=0.01 cosine"``.
    wsi_norm_version : str
        Version of wsi-norm that trained or converted the model.
    """

    teacher: str = ""
    target_template: str = ""
    training_data: str = ""
    epochs: int = 0
    final_loss: float | None = None
    val_loss: float | None = None
    seed: int | None = None
    optimizer: str = ""
    wsi_norm_version: str = ""

    def to_header(self) -> dict[str, str]:
        """Safetensors header metadata: every field as a string (``None`` as ``""``)."""
        out = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = "" if value is None else str(value)
        return out

    @classmethod
    def from_header(cls, header: Mapping[str, str]) -> StainNetMetadata:
        """Inverse of :meth:`to_header`; unknown keys are ignored, bad values: ``ValueError``."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in header:
                continue
            text = header[f.name]
            if f.name == "epochs":
                kwargs[f.name] = int(text)
            elif f.name in ("final_loss", "val_loss"):
                kwargs[f.name] = float(text) if text else None
            elif f.name == "seed":
                kwargs[f.name] = int(text) if text else None
            else:
                kwargs[f.name] = text
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of all fields."""
        return dataclasses.asdict(self)


def _as_weight(value: Any, name: str, shape: tuple[int, ...]) -> NDArray[np.float32]:
    arr = np.array(value, dtype=np.float32, copy=True)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite values")
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False)
class StainNetWeights:
    """The 1,283 parameters of a StainNet model, as float32 numpy arrays, and its metadata.

    Parameters
    ----------
    conv0_weight : (32, 3) float32
        First 1x1 convolution (output channel, input channel = R, G, B).
    conv0_bias : (32,) float32
    conv1_weight : (32, 32) float32
    conv1_bias : (32,) float32
    conv2_weight : (3, 32) float32
    conv2_bias : (3,) float32
    metadata : StainNetMetadata

    Notes
    -----
    Arrays are copied, made read-only and checked for shape and finiteness (``ValueError``).
    The network acts on ``x = (rgb / 255 - 0.5) * 2`` and returns ``y``; the colour is
    ``trunc(clip(y * 0.5 + 0.5, 0, 1) * 255)``.
    """

    conv0_weight: NDArray[np.float32]
    conv0_bias: NDArray[np.float32]
    conv1_weight: NDArray[np.float32]
    conv1_bias: NDArray[np.float32]
    conv2_weight: NDArray[np.float32]
    conv2_bias: NDArray[np.float32]
    metadata: StainNetMetadata = field(default_factory=StainNetMetadata)

    def __post_init__(self) -> None:
        for name, shape in _STATE_KEYS.values():
            flat_shape = shape[:2] if len(shape) == 4 else shape
            object.__setattr__(self, name, _as_weight(getattr(self, name), name, flat_shape))

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], *, metadata: StainNetMetadata | None = None
    ) -> StainNetWeights:
        """Weights from a PyTorch-style state dict (``rgb_trans.{0,2,4}.{weight,bias}``).

        Parameters
        ----------
        state : mapping of str to array-like (numpy arrays or CPU tensors)
            Exactly the six keys of the published models; conv weights (out, in, 1, 1) or
            (out, in).  A ``module.`` prefix (``DataParallel``) is accepted.
        metadata : StainNetMetadata, keyword-only

        Raises
        ------
        ValueError
            A key is missing or unexpected, or an array has the wrong shape (the message says
            which key and which shape).
        """
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing = [k for k in _STATE_KEYS if k not in state]
        unexpected = [k for k in state if k not in _STATE_KEYS]
        if missing or unexpected:
            raise ValueError(
                f"not a StainNet (3-32-32-3) state dict: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        kwargs: dict[str, Any] = {}
        for key, (name, shape) in _STATE_KEYS.items():
            arr = _to_numpy(state[key])
            if arr.shape != shape and not (len(shape) == 4 and arr.shape == shape[:2]):
                raise ValueError(
                    f"key {key!r} has shape {tuple(arr.shape)}, expected {shape} "
                    f"(StainNet with {HIDDEN_CHANNELS} hidden channels)"
                )
            kwargs[name] = arr.reshape(shape[:2]) if len(shape) == 4 else arr
        return cls(**kwargs, metadata=metadata or StainNetMetadata())

    def to_state_dict(self) -> dict[str, NDArray[np.float32]]:
        """State dict in the published layout: conv weights (out, in, 1, 1), contiguous float32."""
        return {
            key: np.ascontiguousarray(getattr(self, name).reshape(shape))
            for key, (name, shape) in _STATE_KEYS.items()
        }

    def to_module(self) -> torch.nn.Module:
        """A :class:`StainNet` torch module (CPU, float32) holding copies of these weights."""
        import torch

        module = cast("torch.nn.Module", _stainnet_class()())
        state = {k: torch.from_numpy(v.copy()) for k, v in self.to_state_dict().items()}
        module.load_state_dict(state, strict=True)
        return module

    @classmethod
    def from_module(
        cls, module: torch.nn.Module, *, metadata: StainNetMetadata | None = None
    ) -> StainNetWeights:
        """Weights copied from a :class:`StainNet` module (any device)."""
        return cls.from_state_dict(module.state_dict(), metadata=metadata)

    def replace_metadata(self, metadata: StainNetMetadata) -> StainNetWeights:
        """The same weights with other metadata."""
        return dataclasses.replace(self, metadata=metadata)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StainNetWeights):
            return NotImplemented
        return self.metadata == other.metadata and all(
            np.array_equal(getattr(self, name), getattr(other, name))
            for name, _ in _STATE_KEYS.values()
        )

    __hash__ = None  # type: ignore[assignment]


def _to_numpy(value: Any) -> NDArray[np.float32]:
    """A tensor or array-like as a float32 numpy array (a tensor is detached and moved to CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().to("cpu").float().numpy()
    return np.asarray(value, dtype=np.float32)


# --------------------------------------------------------------------------- torch module


def _stainnet_class() -> type:
    """Create (once) the torch ``StainNet`` module class; imports torch."""
    cls = globals().get("_StainNetClass")
    if cls is not None:
        return cls  # type: ignore[no-any-return]
    from torch import nn

    class StainNet(nn.Module):
        """StainNet (Kang et al. 2021): Conv1x1(3->32), ReLU, Conv1x1(32->32), ReLU, Conv1x1(32->3).

        ``forward`` takes ``(N, 3, H, W)`` float in [-1, 1] (``(rgb / 255 - 0.5) * 2``) and
        returns ``(N, 3, H, W)`` float, the colour being ``y * 0.5 + 0.5`` clamped to [0, 1].
        Pixels in a list go through :func:`network_pixels` (one image row).
        """

        def __init__(self, hidden_channels: int = HIDDEN_CHANNELS) -> None:
            super().__init__()
            self.rgb_trans = nn.Sequential(
                nn.Conv2d(3, hidden_channels, kernel_size=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden_channels, hidden_channels, kernel_size=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden_channels, 3, kernel_size=1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rgb_trans(x)  # type: ignore[no-any-return]

    StainNet.__module__ = __name__
    StainNet.__qualname__ = "StainNet"
    globals()["_StainNetClass"] = StainNet
    globals()["StainNet"] = StainNet
    return StainNet


def network_pixels(module: Any, x: torch.Tensor) -> torch.Tensor:
    """The network on ``(P, 3)`` pixels in [-1, 1]: the module on them as one ``(1, 3, 1, P)``
    image row, the output ``(P, 3)`` before rescaling. Every path (CPU slabs, the LUT, CUDA,
    training) goes through here, so there is one arithmetic: the published module's."""
    return module(x.T[None, :, None, :])[0, :, 0, :].T  # type: ignore[no-any-return]


def network_colour(module: Any, flat: torch.Tensor) -> torch.Tensor:
    """``(P, 3)`` uint8 pixels -> the network's ``(P, 3)`` uint8 colour, as the authors compute
    it: ``(rgb / 255 - 0.5) * 2`` in, ``clip(y * 0.5 + 0.5, 0, 1) * 255`` truncated out."""
    import torch

    dtype = next(module.parameters()).dtype
    y = network_pixels(module, (flat.to(dtype) / 255.0 - 0.5) * 2.0)
    return ((y * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def __getattr__(name: str) -> Any:
    if name == "StainNet":
        return _stainnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- files


def load_stainnet(path: str | os.PathLike[str]) -> StainNetWeights:
    """Read StainNet weights from a ``.pth``/``.pt`` checkpoint or a ``.safetensors`` file.

    Parameters
    ----------
    path : path-like
        ``.pth`` / ``.pt``: a plain PyTorch state dict such as the published checkpoints
        (``torch.load(weights_only=True, map_location="cpu")``: a pickle that would build
        arbitrary objects or run code is refused, never executed).  ``.safetensors``: a file
        written by :func:`save_stainnet`, with its metadata in the header.

    Returns
    -------
    StainNetWeights
        For a ``.pth`` file the metadata says only where the weights came from.

    Raises
    ------
    WeightsError
        The file is missing, of an unknown suffix, not a checkpoint (garbage, an image, a
        pickle holding code), or a checkpoint of another architecture (the message names the
        key and shape).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        state = _read_torch_state(path)
        metadata = StainNetMetadata(training_data=f"PyTorch checkpoint {path.name}")
    elif suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
    else:
        raise WeightsError(
            f"{path}: unknown weights suffix {suffix!r}; expected .pth, .pt or .safetensors"
        )
    try:
        return StainNetWeights.from_state_dict(state, metadata=metadata)
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from exc


MAX_WEIGHTS_BYTES = 64 << 20
"""Most bytes a weights file may declare (all its tensors, or all entries of a ``.pth`` zip,
uncompressed): StainNet's weights are 5 KB, so 64 MiB leaves room for a training checkpoint
while a file that would expand to gigabytes is refused before anything is decompressed."""
_MAX_COMPRESSION_RATIO = 100
_MAX_ZIP_ENTRIES = 10_000
_MAX_SAFETENSORS_HEADER = 1 << 20
_SAFETENSORS_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def _check_torch_zip(path: Path) -> None:
    """Check a ``.pth`` zip archive's directory before ``torch.load`` decompresses anything.

    The sizes checked are those the zip's central directory declares (what a reader allocates):
    their sum must stay under :data:`MAX_WEIGHTS_BYTES`, and no large entry may expand more than
    100-fold (torch.save stores entries uncompressed; a deflate ratio near 1000 is a zip bomb).
    A file that is not a zip (the legacy pickle format) is bounded by its own size.
    """
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        if size > MAX_WEIGHTS_BYTES:
            raise WeightsError(
                f"{path}: {size:,} bytes, over the limit of {MAX_WEIGHTS_BYTES:,} for a weights file"
            )
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint (zip: {exc})") from exc
    if len(entries) > _MAX_ZIP_ENTRIES:
        raise WeightsError(f"{path}: {len(entries):,} zip entries; a StainNet checkpoint has about 8")
    total = sum(e.file_size for e in entries)
    if total > MAX_WEIGHTS_BYTES:
        raise WeightsError(
            f"{path}: its zip entries declare {total:,} bytes uncompressed, over the limit of "
            f"{MAX_WEIGHTS_BYTES:,} for a weights file (StainNet's weights are 5 KB)"
        )
    for entry in entries:
        if entry.file_size > (1 << 20) and entry.file_size > _MAX_COMPRESSION_RATIO * max(entry.compress_size, 1):
            raise WeightsError(
                f"{path}: zip entry {entry.filename!r} expands {entry.compress_size:,} -> "
                f"{entry.file_size:,} bytes (over {_MAX_COMPRESSION_RATIO}x): refused as a zip bomb"
            )


def _unpickling_problem(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, without its advice to switch it off."""
    import re

    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"its pickle asks for the global {found.group(1)}, which a plain state dict of "
            "tensors never needs; refused (weights are loaded with weights_only=True, no code runs)"
        )
    for line in text.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and "weights_only" not in line and "Weights only load failed" not in line \
                and not line.startswith("Check the documentation"):
            return line
    return type(exc).__name__


def _read_torch_state(path: Path) -> Mapping[str, Any]:
    import torch

    _check_torch_zip(path)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        OSError,
        # the weights-only unpickler walks arbitrary bytes of a damaged file and can
        # fail on its own stack or memo (seen: IndexError "pop from empty list")
        IndexError,
        KeyError,
        TypeError,
        AttributeError,
    ) as exc:
        if isinstance(exc, pickle.UnpicklingError):  # torch's text advises weights_only=False
            first = _unpickling_problem(exc)
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: not a PyTorch checkpoint that torch.load(weights_only=True) accepts ({first})"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def _check_safetensors_header(path: Path) -> None:
    """Check a ``.safetensors`` header against the file and StainNet before any tensor is read.

    Reads the 8-byte header length and the JSON header only; every tensor must be one of
    StainNet's six with its shape, a float dtype, byte offsets that match that shape and lie
    inside the file, and all of them together under :data:`MAX_WEIGHTS_BYTES`.
    """
    import json

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a readable safetensors file ({size} bytes, no header)")
        header_len = int.from_bytes(head, "little")
        if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise WeightsError(
                f"{path}: not a readable safetensors file: header of {header_len:,} bytes declared "
                f"(the file has {size:,} bytes; at most {_MAX_SAFETENSORS_HEADER:,} read)"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file: its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a readable safetensors file: its header is not a JSON object")
    data_bytes = size - 8 - header_len
    total = 0
    tensors = {k.removeprefix("module."): (k, v) for k, v in header.items() if k != "__metadata__"}
    for name, (key, _) in tensors.items():
        if name not in _STATE_KEYS:
            raise WeightsError(
                f"{path}: not a StainNet (3-32-32-3) state dict: unexpected key {key!r} "
                f"(expected {', '.join(_STATE_KEYS)})"
            )
    for name in (n for n in _STATE_KEYS if n in tensors):  # in layer order, as the messages read
        key, info = tensors[name]
        if not isinstance(info, dict):
            raise WeightsError(f"{path}: tensor {key!r}: malformed header entry")
        expected = _STATE_KEYS[name][1]
        shape, dtype, offsets = info.get("shape"), info.get("dtype"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise WeightsError(f"{path}: tensor {key!r}: malformed shape {shape!r}")
        if tuple(shape) != expected and not (len(expected) == 4 and tuple(shape) == expected[:2]):
            raise WeightsError(
                f"{path}: key {key!r} has shape {tuple(shape)}, expected {expected} "
                f"(StainNet with {HIDDEN_CHANNELS} hidden channels; read from the header, nothing loaded)"
            )
        if dtype not in _SAFETENSORS_DTYPE_BYTES:
            raise WeightsError(f"{path}: tensor {key!r} has dtype {dtype!r}; StainNet weights are floats")
        nbytes = _SAFETENSORS_DTYPE_BYTES[dtype] * int(np.prod(shape))
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
                and 0 <= offsets[0] <= offsets[1] and offsets[1] - offsets[0] == nbytes):
            raise WeightsError(
                f"{path}: tensor {key!r}: data_offsets {offsets!r} do not hold {nbytes} bytes "
                f"of {dtype} {tuple(shape)}"
            )
        if offsets[1] > data_bytes:
            raise WeightsError(
                f"{path}: tensor {key!r} ends at byte {offsets[1]:,} of the data, but the file "
                f"holds only {data_bytes:,} data bytes (truncated?)"
            )
        total += nbytes
    if total > MAX_WEIGHTS_BYTES:
        raise WeightsError(f"{path}: declares {total:,} bytes of tensors, over {MAX_WEIGHTS_BYTES:,}")


def _read_safetensors(path: Path) -> tuple[dict[str, NDArray[Any]], StainNetMetadata]:
    from safetensors import SafetensorError, safe_open

    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    if header.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise WeightsError(
            f"{path}: safetensors header says format {header['format']!r}, expected {FORMAT_NAME!r}"
        )
    try:
        metadata = StainNetMetadata.from_header(header)
    except ValueError as exc:
        raise WeightsError(f"{path}: bad metadata in the safetensors header: {exc}") from exc
    return state, metadata


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("wsi-norm")
    except PackageNotFoundError:
        from wsi_norm import __version__

        return str(__version__)


def save_stainnet(
    model: StainNetWeights | torch.nn.Module,
    path: str | os.PathLike[str],
    metadata: StainNetMetadata | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write StainNet weights and metadata to a ``.safetensors`` file.

    The tensors use the published state-dict keys and shapes (so the file also loads into the
    authors' code via ``safetensors.torch.load_file``); every metadata field is a string in the
    safetensors header (readable with any safetensors tool).  The file is written to
    ``<path>.partial`` and renamed, so a reader never sees half a file.

    Parameters
    ----------
    model : StainNetWeights or StainNet module
    path : path-like, must end in ``.safetensors``
    metadata : StainNetMetadata, optional
        Defaults to ``model.metadata`` (weights) or an empty record (module).  An empty
        ``wsi_norm_version`` is filled in.
    overwrite : bool, keyword-only
        Replace an existing file.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    WeightsError
        ``path`` does not end in ``.safetensors``.
    OutputExistsError
        The file exists and ``overwrite`` is false.
    OutputError
        The file could not be written.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(
            f"{path}: StainNet weights are saved as .safetensors, got suffix {path.suffix!r}"
        )
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists (pass overwrite=True to replace it)")
    weights = model if isinstance(model, StainNetWeights) else StainNetWeights.from_module(model)
    meta = metadata if metadata is not None else weights.metadata
    if not meta.wsi_norm_version:
        meta = dataclasses.replace(meta, wsi_norm_version=_package_version())
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(weights.to_state_dict(), str(partial), metadata=meta.to_header())
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{path}: could not write StainNet weights: {exc}") from exc
    return path


# --------------------------------------------------------------------------- colour map


class StainNetMap(ColorMap):
    """StainNet as a per-pixel :class:`~wsi_norm.colormap.ColorMap` (the published module, numpy reference, LUT).

    Parameters
    ----------
    weights : StainNetWeights
    glass : GlassBlend, keyword-only, optional
        None (default): every pixel through the network, as the published models do.  A
        ``GlassBlend`` (``mode="keep"``) keeps the source's glass, blended smoothly.
    cpu_method : {"auto", "direct", "lut"}, keyword-only
        How :meth:`apply` evaluates.  ``"direct"``: the published module on slabs of pixels
        (about 3 MP/s on 2 cores; nothing to build).  ``"lut"``: gather from the 256^3 table
        (about 360 MP/s per core on H&E colours; building it costs as much as 16.7 MP of direct
        evaluation, about 6 s).  ``"auto"`` (default): direct until ``lut_after_px`` pixels have been mapped,
        then build the LUT and gather; both give bit-identical output, so the switch is
        invisible.
    lut_after_px : int, keyword-only
        Pixels mapped directly before ``"auto"`` builds the LUT (default 256^3: the LUT is
        built once it would have paid for itself, so the total cost is at most twice the
        cheaper of the two strategies).

    Notes
    -----
    The same contract as the closed-form maps of :mod:`wsi_norm.colormap.maps`:
    :meth:`evaluate_numpy` is the definition (here the published module on fixed-size slabs,
    through :func:`network_colour`), the LUT is built from it and :meth:`apply` (direct or LUT)
    and the CUDA LUT gather are bit-identical to it.  StainNet's colour is *truncated* (the
    authors' ``uint8`` cast), not rounded.  Device direct evaluation (``apply_torch(...,
    use_lut=False)``) runs the same module on other hardware: within one grey level.

    Picklable: the pickle holds the weights and options only (a few KB); the LUT and device
    copies are rebuilt where needed.  Thread-safe.
    """

    method: ClassVar[str] = "stainnet"

    def __init__(
        self,
        weights: StainNetWeights,
        *,
        glass: GlassBlend | None = None,
        cpu_method: Method = "auto",
        lut_after_px: int = _LUT_SIZE,
    ) -> None:
        if not isinstance(weights, StainNetWeights):
            raise TypeError(f"weights must be StainNetWeights, got {type(weights).__name__}")
        if cpu_method not in ("auto", "direct", "lut"):
            raise ValueError(f"cpu_method must be 'auto', 'direct' or 'lut', got {cpu_method!r}")
        if lut_after_px < 0:
            raise ValueError(f"lut_after_px must be >= 0, got {lut_after_px}")
        super().__init__(glass=glass)
        self.weights = weights
        self.cpu_method: Method = cpu_method
        self.lut_after_px = int(lut_after_px)
        self._init_caches()

    def _init_caches(self) -> None:
        self._modules: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._lut = None
        self._torch_luts = {}
        self._mapped_px = 0

    def __getstate__(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "glass": self.glass,
            "cpu_method": self.cpu_method,
            "lut_after_px": self.lut_after_px,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"]
        self.glass = state["glass"]
        self.cpu_method = state["cpu_method"]
        self.lut_after_px = state["lut_after_px"]
        self._init_caches()

    def __repr__(self) -> str:
        return (
            f"StainNetMap(glass={self.glass}, cpu_method={self.cpu_method!r}, "
            f"lut={'built' if self._lut is not None else 'not built'})"
        )

    # ----------------------------------------------------------------- the definition

    def evaluate_numpy(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """The map's definition: the published module on fixed slabs of pixels, glass blend after.

        Parameters
        ----------
        rgb : (..., 3) uint8

        Returns
        -------
        (..., 3) uint8, bit-identical to :meth:`apply` and to the LUT (which is built from it)
        """
        arr = _check_rgb(rgb)
        flat = np.ascontiguousarray(arr.reshape(-1, 3))
        return self._blend_numpy(flat, self._forward_slabs(flat)).reshape(arr.shape)

    def _blend_numpy(self, flat: NDArray[np.uint8], net: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """The glass blend on the network's 8-bit colour (identity without a blend), rounded."""
        if self.glass is None:
            return net
        x = flat.T.astype(np.float64)
        mapped = self.glass.apply(np, x[0], x[1], x[2], list(net.T.astype(np.float64)))
        return np.stack([np.clip(np.rint(m), 0.0, 255.0) for m in mapped], axis=1).astype(np.uint8)

    # ----------------------------------------------------------------- CPU fast path

    def apply(self, rgb: NDArray[np.uint8], *, method: Method | None = None) -> NDArray[np.uint8]:
        """Map colours on the CPU (releases the GIL; safe to call from many threads).

        Parameters
        ----------
        rgb : (..., 3) uint8
        method : {"auto", "direct", "lut"}, optional, keyword-only
            Overrides ``cpu_method`` for this call.

        Returns
        -------
        (..., 3) uint8, a new array
        """
        arr = _check_rgb(rgb)
        flat = np.ascontiguousarray(arr.reshape(-1, 3))
        out = np.empty_like(flat)
        how = method or self.cpu_method
        if how not in ("auto", "direct", "lut"):
            raise ValueError(f"method must be 'auto', 'direct' or 'lut', got {how!r}")
        if how == "auto":
            with self._lock:
                self._mapped_px += flat.shape[0]
                due = self._mapped_px >= self.lut_after_px
            how = "lut" if (due or self.has_cached_lut()) else "direct"
        if how == "lut":
            self._gather(flat, out)
            return out.reshape(arr.shape)
        return self.evaluate_numpy(arr)

    def _module(self, device: Any = "cpu", dtype: Any = None) -> Any:
        """The ``StainNet`` module with these weights on ``device`` in ``dtype`` (default float32),
        built once per device and dtype, in eval mode."""
        import torch

        dtype = dtype or torch.float32
        key = f"{device}/{dtype}"
        with self._lock:
            module = self._modules.get(key)
            if module is None:
                module = self.weights.to_module().to(device=device, dtype=dtype).eval()
                self._modules[key] = module
            return module

    def _forward_slabs(self, flat: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """The published arithmetic on ``(P, 3) uint8`` pixels, in fixed ``(1, 3, 1, 65536)`` slabs."""
        import torch

        module = self._module()
        out = np.empty_like(flat)
        slab = np.zeros((_SLAB_PX, 3), dtype=np.uint8)
        with torch.inference_mode():
            for start in range(0, flat.shape[0], _SLAB_PX):
                n = min(_SLAB_PX, flat.shape[0] - start)
                slab[:n] = flat[start : start + n]
                slab[n:] = 0
                out[start : start + n] = network_colour(module, torch.from_numpy(slab)).numpy()[:n]
        return out

    def __call__(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Same as :meth:`apply`."""
        return self.apply(rgb)

    def lut(self) -> NDArray[np.uint8]:
        """The exact 256^3 lookup table, built on first call (48 MiB; 3-9 s on 2 busy cores).

        Returns
        -------
        (256, 256, 256, 3) uint8, read-only
            ``lut[r, g, b]`` is the mapped colour of ``(r, g, b)``, computed by the same module
            slabs as ``apply(method="direct")`` (bit-identical), glass blend included.
        """
        return super().lut()

    def _build_lut(self) -> NDArray[np.uint8]:
        lut = np.empty((256, 256 * 256, 3), dtype=np.uint8)
        green, blue = np.meshgrid(
            np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij"
        )
        block = np.empty((256 * 256, 3), dtype=np.uint8)
        block[:, 1] = green.ravel()
        block[:, 2] = blue.ravel()
        for red in range(256):  # one slab per red value; torch runs each on all cores
            block[:, 0] = red
            lut[red] = self._blend_numpy(block, self._forward_slabs(block))
        cube = lut.reshape(256, 256, 256, 3)
        cube.flags.writeable = False
        return cube

    # ----------------------------------------------------------------- torch

    def apply_torch(
        self, t: torch.Tensor, *, use_lut: bool | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Map a uint8 tensor on its own device (CPU or GPU).

        Parameters
        ----------
        t : (..., 3) torch.uint8 tensor, channels last, any device
            Move tiles to the GPU as uint8 (3 bytes per pixel); conversion to float happens on
            the device.
        use_lut : bool or None, keyword-only
            ``True``: gather from the CPU-built LUT copied to the device once (48 MiB),
            bit-identical to :meth:`apply`.  ``False``: matrix products on the device (the 1x1
            convolutions on ``(P, 3)`` pixels), in chunks of 4 MP, within one grey level of
            :meth:`apply`.  ``None`` (default): the LUT on CUDA (identical output on CPU and GPU
            workers); on CPU the tensor is handed to :meth:`apply` (no copy).
        dtype : torch float dtype, keyword-only
            Precision of direct evaluation, default ``torch.float32``.

        Returns
        -------
        (..., 3) torch.uint8 tensor on ``t.device``
        """
        import torch

        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise TypeError(
                f"t must be a torch.uint8 tensor, got {type(t).__name__} {getattr(t, 'dtype', '')}"
            )
        if t.ndim < 1 or t.shape[-1] != 3:
            raise ValueError(f"t must have shape (..., 3), got {tuple(t.shape)}")
        if use_lut is None:
            if t.device.type == "cpu":
                return torch.from_numpy(self.apply(t.contiguous().numpy()))
            use_lut = True
        flat = t.reshape(-1, 3)
        if use_lut:
            table: torch.Tensor = self.device_lut(t.device)
            idx = flat.to(torch.int64)
            return table[(idx[:, 0] << 16) | (idx[:, 1] << 8) | idx[:, 2]].reshape(t.shape)
        module = self._module(t.device, dtype)
        out = torch.empty_like(flat)
        with torch.inference_mode():
            for start in range(0, flat.shape[0], _TORCH_CHUNK_PX):
                chunk = flat[start : start + _TORCH_CHUNK_PX]
                out[start : start + _TORCH_CHUNK_PX] = _torch_forward(chunk, module, self.glass)
        return out.reshape(t.shape)


def _torch_forward(flat: torch.Tensor, module: Any, glass: GlassBlend | None) -> torch.Tensor:
    """(P, 3) uint8 tensor -> (P, 3) uint8 tensor on the same device, glass blend included."""
    import torch

    out = network_colour(module, flat)
    if glass is not None:
        x = flat.T.to(torch.float64)
        mapped = glass.apply(torch, x[0], x[1], x[2], list(out.T.to(torch.float64)))
        out = torch.stack([torch.clamp(torch.round(m), 0.0, 255.0) for m in mapped], dim=1).to(torch.uint8)
    return out


def load_stainnet_map(
    path: str | os.PathLike[str], *, glass: GlassBlend | None = None, cpu_method: Method = "auto"
) -> StainNetMap:
    """Load weights (:func:`load_stainnet`) and wrap them in a :class:`StainNetMap`.

    Parameters
    ----------
    path : path-like, ``.pth``, ``.pt`` or ``.safetensors``
    glass, cpu_method : see :class:`StainNetMap`

    Raises
    ------
    WeightsError
        See :func:`load_stainnet`.
    """
    return StainNetMap(load_stainnet(path), glass=glass, cpu_method=cpu_method)
