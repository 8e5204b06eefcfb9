"""Where the project's real data are: one rule for the generator, the benchmarks and the tests.

``$WSI_NORM_DATA`` when set, else ``../shared/data`` beside the checkout (the folder holding
``MANIFEST.md``, ``slides/``, ``he/`` and ``stainnet/``). Nothing else is searched, and nothing
falls back silently: a caller that needs a file it cannot find raises and says where it looked.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV", "data_dir"]

DATA_ENV = "WSI_NORM_DATA"
"""Environment variable naming the real-data folder."""

_BESIDE_CHECKOUT = Path(__file__).resolve().parents[3] / "shared" / "data"


def data_dir() -> Path:
    """The real-data folder (it may not exist: callers check for the files they need)."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else _BESIDE_CHECKOUT
