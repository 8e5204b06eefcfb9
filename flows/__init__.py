"""Prefect flows of wsi-norm: ``normalize-archive``, ``harmonize-sites``, ``train-stainnet``.

Importing this package tunes glibc's malloc to return freed block buffers
(:func:`wsi_norm._malloc.return_freed_memory`) and sets two Prefect settings' defaults
(an explicit value in the environment wins): the first start of Prefect's ephemeral
local API migrates a new database and takes longer than Prefect's 20-second default on a
busy 2-core machine, and telemetry cannot reach the network on closed machines (its
failures end up as database-lock errors).
"""

import os as _os

from wsi_norm._malloc import return_freed_memory as _return_freed_memory

_os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Flow runs stream slides in this process: keep glibc from hoarding freed block buffers.
_return_freed_memory()
