"""Fault-injection hooks for the crash tests (inert unless their variable is set).

- ``DISTCL_PAUSE_AT=<point>:<task>:<marker>``: the first process to reach ``point`` of task
  ``task`` writes ``marker`` (its pid) and sleeps, so a test can SIGKILL the driver at that
  exact moment. Points: ``epoch`` (a Train worker at the start of an epoch after the first,
  once Ray Train's controller took the previous epoch's report),
  ``saved`` (rank 0 after writing ``models/<t>/``, before the end-of-task work), ``memory``
  (rank 0 after exemplar selection, before the commit), ``eval`` (the driver, before the
  evaluation), ``reindex`` (``distcl backfill --apply`` in one process, after writing part
  ``task``: the number of the gallery shard whose items it re-embedded).
- ``DISTCL_FAULT=<marker>:<task>:<epoch>``: a Train worker exits in the middle of that
  epoch (a worker crash; Ray Train restarts the group from its last checkpoint).

A marker that exists means "already fired": a re-run of the same command passes through.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "DISTCL_PAUSE_AT"
FAULT_ENV = "DISTCL_FAULT"


def pause_point(spec: str | None, point: str, task: int) -> None:
    """Sleep at ``point`` of ``task`` when ``spec`` (a ``DISTCL_PAUSE_AT`` value) names it."""
    if not spec:
        return
    name, t, marker = spec.split(":", 2)
    if name == point and int(t) == task and not os.path.exists(marker):
        if point == "epoch":  # a Train worker: the epoch before is reported, as in a crash
            _wait_until_reports_taken()
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)  # the test kills the driver (or a node) now


def maybe_exit(spec: str | None, task: int, epoch: int, batch: int, batches: int) -> None:
    """Exit this worker process once, at batch ``batches // 2`` of ``epoch`` of ``task``
    (``DISTCL_FAULT``), as a crash mid-epoch.

    Ray Train's controller takes a worker's reports by polling (every 0.5 s in distcl's
    runs): a worker that dies right after a report loses that report, and its group restarts
    from the checkpoint before (exact still, one epoch repeated). A real crash mid-epoch
    comes long after the epoch's report (an epoch takes minutes); this one first waits until
    the controller took the report, so the test sees the resume a real crash would get.
    """
    if not spec or batch != batches // 2:
        return
    marker, t, e = spec.rsplit(":", 2)
    if int(t) == task and int(e) == epoch and not os.path.exists(marker):
        Path(marker).write_text("fired")
        _wait_until_reports_taken()
        os._exit(1)


def _wait_until_reports_taken() -> None:
    from distcl.raycompat import wait_until_reports_taken

    wait_until_reports_taken()
