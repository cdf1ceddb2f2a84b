"""Shared pytest fixtures: small, seconds-fast synthetic jobs for any test module.

    def test_something(synthetic_job):
        job = synthetic_job(scenario={"tasks": 2}, seed=3)        # output under tmp_path
        job = synthetic_job(sets=["train.epochs=2"], smoke=True)  # --set / --smoke as in the CLI

    @pytest.fixture(scope="module")
    def built(make_job, tmp_path_factory):                       # module-scoped variant
        job = make_job(tmp_path_factory.mktemp("shards"), scenario={"tasks": 2})

Keyword arguments that are mappings are deep-merged into the default section of that name
(``data``, ``scenario``, ``train``, ...); other keywords (``name``, ``seed``) replace the
top-level value. The defaults: 8 synthetic classes of 32 train / 8 test 16x16 grey images,
4 disjoint tasks, shards of 16 samples, method finetune, 1 epoch, 2 CPU workers.

Run: ``.venv/bin/python -m pytest tests -q``
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from rayhead import ray_head  # noqa: F401  (a real Ray head on 127.0.0.1, one per session)
from s3server import s3  # noqa: F401  (a moto S3 server on 127.0.0.1, session scope)

from distcl.config import JobConfig, parse_job

SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "name": "synthetic",
    "seed": 0,
    "data": {
        "source": "synthetic",
        "synthetic_classes": 8,
        "synthetic_train_per_class": 32,
        "synthetic_test_per_class": 8,
        "synthetic_size": 16,
        "shard_size": 16,
    },
    "scenario": {"setup": "disjoint", "tasks": 4},
    "method": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size_per_worker": 8, "workers": 2, "use_gpu": "no"},
}


def _merge(base: dict, extra: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def synthetic_raw(root: str | Path, **overrides: Any) -> dict:
    """The raw job mapping of :func:`make_job` (e.g. to write it to a YAML file)."""
    raw = _merge(SYNTHETIC_DEFAULTS, {"output": {"root": str(Path(root) / "runs")}})
    return _merge(raw, overrides)


def _make_job(
    root: str | Path, sets: Sequence[str] = (), smoke: bool | None = None, **overrides: Any
) -> JobConfig:
    return parse_job(synthetic_raw(root, **overrides), "<synthetic_job>", list(sets), smoke)


@pytest.fixture(scope="module")
def shared_ray():
    """The session's one local Ray (distcl's embedded Ray, 2 CPUs) for the modules that run
    Ray work in this process: the modules that ask for it run first, one after the other
    (:func:`pytest_collection_modifyitems`), and it ends after the last of them, so later
    modules find no Ray, as before. A Ray already running (a module's own) is used as is."""
    import ray

    from distcl.localray import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use ``shared_ray`` first (a stable sort: each module's order kept)."""
    items.sort(key=lambda item: "shared_ray" not in getattr(item, "fixturenames", ()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """Shut the shared Ray down once no further test uses it (after the last one's module
    fixtures are torn down: they may still talk to Ray)."""
    yield
    uses = "shared_ray" in getattr(item, "fixturenames", ())
    if uses and (nextitem is None or "shared_ray" not in getattr(nextitem, "fixturenames", ())):
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def make_job() -> Callable[..., JobConfig]:
    """Factory ``make_job(root, sets=(), smoke=None, **overrides) -> JobConfig`` with
    ``output.root`` under ``root`` (use with ``tmp_path_factory`` in module fixtures)."""
    return _make_job


@pytest.fixture(scope="session")
def synthetic_raw_job() -> Callable[..., dict]:
    """Factory ``synthetic_raw_job(root, **overrides) -> dict``: the mapping before
    validation, for tests that write job files."""
    return synthetic_raw


@pytest.fixture
def synthetic_job(tmp_path: Path) -> Callable[..., JobConfig]:
    """Factory ``synthetic_job(sets=(), smoke=None, **overrides) -> JobConfig`` writing
    under this test's ``tmp_path``."""

    def make(sets: Sequence[str] = (), smoke: bool | None = None, **overrides: Any) -> JobConfig:
        return _make_job(tmp_path, sets, smoke, **overrides)

    return make
