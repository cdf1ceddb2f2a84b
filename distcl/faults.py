"""Fault-injection hooks for the crash tests (inert unless their variable is set).

- ``DISTCL_PAUSE_AT=<point>:<task>:<marker>``: the first process to reach ``point`` of task
  ``task`` writes ``marker`` (its pid) and sleeps, so a test can SIGKILL the driver at that
  exact moment. Points: ``epoch`` (a Train worker at the start of an epoch after the first),
  ``saved`` (rank 0 after writing ``models/<t>/``, before the end-of-task work), ``memory``
  (rank 0 after exemplar selection, before the commit), ``eval`` (the driver, before the
  evaluation).
- ``DISTCL_FAULT=<marker>:<task>:<epoch>``: a Train worker exits at the start of that epoch
  (a worker crash; Ray Train restarts the group from its last checkpoint).

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
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)  # the test kills the driver now


def maybe_exit(spec: str | None, task: int, epoch: int) -> None:
    """Exit this worker process once at the start of ``epoch`` of ``task`` (``DISTCL_FAULT``)."""
    if not spec:
        return
    marker, t, e = spec.rsplit(":", 2)
    if int(t) == task and int(e) == epoch and not os.path.exists(marker):
        Path(marker).write_text("fired")
        os._exit(1)
