"""Prefect flows of wsi-norm: ``normalize-archive``, ``harmonize-sites``, ``train-stainnet``.

Installed with wsi-norm (``import flows`` works anywhere), with the archive manifest
(:mod:`flows.manifest`) and the README's demo (:mod:`flows.demo`).

Importing this package changes nothing in the process. Entry points (``python -m flows.…``,
the demo, the test session) call :func:`configure_process`, and each flow run calls
:func:`wsi_norm.runtime.return_freed_memory` as it starts.
"""

from __future__ import annotations

import os

from wsi_norm.runtime import return_freed_memory

__all__ = ["configure_process"]

_PREFECT_DEFAULTS = {
    # the first start of Prefect's ephemeral local API migrates a new database and takes longer
    # than Prefect's 20-second default on a busy 2-core machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # telemetry cannot reach the network on closed machines (its failures end up as
    # database-lock errors)
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def configure_process() -> None:
    """Process-wide settings for a flow entry point (an explicit environment value wins).

    Sets the Prefect defaults above and tunes glibc's malloc to return freed block buffers
    (:func:`wsi_norm.runtime.return_freed_memory`: slides stream through this process).
    """
    for name, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return_freed_memory()
