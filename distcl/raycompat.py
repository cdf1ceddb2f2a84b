"""The one place where distcl reaches into Ray beyond its public API, checked at import.

Everything else in distcl uses Ray's public (PublicAPI / DeveloperAPI) surface:
``ray.train.v2.api.data_parallel_trainer.DataParallelTrainer``, ``ray.train.backend``,
``ray.train.get_context``, ``ray.tune``, ``ray.util`` (tests/test_raycompat.py walks the
import graph and fails on any ``_internal`` / ``_private`` import outside this module).
What is here has no public equivalent in the supported releases; each function says why:

- :func:`loopback_only`: an embedded Ray bound to 127.0.0.1 only. Ray rewrites a loopback
  node address to the host's routable one unless its single-machine mode is on, and that mode
  is a constant read once at import (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``), before distcl can
  set the variable (``import ray`` comes first in any program that uses distcl).
- :func:`enable_token_auth`: token authentication for an embedded Ray. ``RAY_AUTH_MODE=token``
  in the environment is public, but this process's cached C++ config was read at ``import
  ray``; only Ray's own set-up function re-reads it.
- :func:`tune_result_queue`: the queue through which a Tune trial receives results from its
  Train workers. Ray's public ``TuneReportCallback`` uses exactly this queue, but forwards
  every Train report (distcl's per-epoch checkpoints too) and lets the workers run on before
  Tune decides; distcl sends one result per task and waits for the scheduler's answer
  (:class:`distcl.tune.trial.TuneLink`), so a stopped trial ends between two tasks.
- :func:`wait_until_reports_taken` (fault-injection tests only) and
  :func:`quiet_train_logs` (Ray Train's per-report log line, which has no public switch).

A Ray outside :data:`SUPPORTED_RAY` fails here, at import, with that range named: the suite
has passed on these releases only (``pyproject.toml`` declares the same range; a test checks
both and the installed release).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray
from packaging.specifiers import SpecifierSet
from packaging.version import Version

#: The Ray releases the suite has passed on (pyproject.toml's ``ray[...]`` requirement).
SUPPORTED_RAY = ">=2.60,<2.61"


class UnsupportedRay(ImportError):
    """The installed Ray is outside :data:`SUPPORTED_RAY`."""


def check_ray_version(version: str = ray.__version__) -> str:
    """``version`` if it is in :data:`SUPPORTED_RAY`, else :class:`UnsupportedRay` naming
    the range and what to do."""
    if Version(version) not in SpecifierSet(SUPPORTED_RAY):
        raise UnsupportedRay(
            f"distcl supports Ray {SUPPORTED_RAY}, but Ray {version} is installed: install a "
            f"supported release (pip install 'ray[default,train,tune]{SUPPORTED_RAY}') or a "
            "distcl release made for yours"
        )
    return version


check_ray_version()


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While the block starts a Ray, its node address stays 127.0.0.1 (Ray's single-machine
    mode, in this process and in the processes it starts)."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # pragma: no cover - checked range
        raise UnsupportedRay("this Ray release has no single-machine mode")
    old_env = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    old = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # the processes it starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process (read at import)
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old
        if old_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = old_env


def enable_token_auth() -> None:
    """``RAY_AUTH_MODE=token`` for this process (its cached config re-read) and its children."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()


def tune_result_queue():
    """The current Tune trial's queue for results sent from other actors (a
    ``ray.util.queue.Queue`` of one slot, read by the trial between its results)."""
    from ray.train._internal.session import get_session

    return get_session()._get_or_create_inter_actor_queue()


def wait_until_reports_taken(timeout_s: float = 120.0) -> None:
    """In a Train worker: until the controller took this worker's pending reports (test
    tooling: a crash injected right after a report would otherwise lose it)."""
    import time

    try:
        from ray.train.v2._internal.execution.context import get_train_context

        queue = get_train_context().get_result_queue()
    except Exception:  # no Train context: the poll interval, twice
        time.sleep(4)
        return
    deadline = time.monotonic() + timeout_s
    while not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.1)


def quiet_train_logs() -> None:
    """Ray Train's "Reporting training result ..." line (one per report and worker) off: the
    driver draws progress instead. Its logger is named after a file path, not a module."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
