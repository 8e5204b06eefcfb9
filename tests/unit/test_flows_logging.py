"""The flows' logging: what they keep out of a run's log (flows._common)."""

from __future__ import annotations

import logging

from flows._common import _ThreadTimeoutNotice, quiet_thread_timeout_notice


def test_prefects_thread_timeout_notice_is_dropped_and_nothing_else() -> None:
    """The flows give every slide's task the manifest's timeout on Prefect's thread pool; Prefect
    then warns once a slide that a worker thread's blocking call cannot be interrupted (the
    manifest documents it). The filter drops that notice only, and is installed once."""
    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("prefect.task_runs", logging.WARNING, __file__, 1, msg, args, None)

    notice = ("Timeout of %s seconds configured for this task, but the task is running in a worker thread. "
              "Timeouts in worker threads cannot interrupt blocking operations")
    keep = _ThreadTimeoutNotice()
    assert not keep.filter(record(notice, 14400.0))
    assert keep.filter(record("Task run failed with exception: TimeoutError"))
    assert keep.filter(record("Timeout of the slide's read"))
    logger = logging.getLogger("prefect.task_runs")
    before = list(logger.filters)
    try:
        quiet_thread_timeout_notice()
        quiet_thread_timeout_notice()
        assert sum(isinstance(f, _ThreadTimeoutNotice) for f in logger.filters) == 1
    finally:
        logger.filters[:] = before
