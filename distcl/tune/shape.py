"""How long one tuning trial takes in each shape, on this machine (docs/tuning.md).

    .venv/bin/python -m distcl.tune.shape jobs/fashion_mnist/tune_cl2r.yaml \
        --set data.train_per_class=200 --out runs/shape.json

Runs the job's trial (its own values, ``tune.workers_per_trial`` workers) three times, each in
a fresh output folder, one after the other:

    per-task     one Ray Train run per task (``Run.train(upto=t + 1)`` for t = 0..T-1), the
                 shape before issue 17 (the old ``TrialRunner``), scored after every task
    one-run      one Train run for the whole sequence, scored on the workers (a trial now)
    shared-base  one-run, starting from a first task trained elsewhere (the search's shared
                 base: its cost is paid once per search, not per trial)

and prints the wall seconds of each and trials per hour per trial slot (3600 / wall). The
shards are built once, before the clock starts. Nothing here runs under Tune: it measures
what a trial does, not Tune's scheduling (which is the same in every shape).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def _trial_job(job, root: Path, name: str, shards: Path):
    from distcl.tune.space import base_dict, trial_job

    base = base_dict(job)
    base["data"]["shards_dir"] = str(shards)  # one shard folder for every shape
    return trial_job(base, {}, name, str(root))


def measure(job, root: Path, log=print) -> dict:
    """Wall seconds of one trial of ``job`` in each shape (see the module docstring)."""
    from distcl.data.shards import build_shards
    from distcl.train.driver import Run, init_ray
    from distcl.tune.base import adopt_base, train_base
    from distcl.tune.trial import score_tune

    init_ray()
    tc = job.tune
    later = list(tc.space)
    shards = root / "shards"
    build_shards(_trial_job(job, root, "probe", shards))
    out: dict = {"tasks": None}

    def run_shape(shape: str) -> float:
        shutil.rmtree(root / shape, ignore_errors=True)
        run = Run(_trial_job(job, root / shape, f"{job.name}-{shape}", shards), progress=False,
                  log=lambda m: log(f"[{shape}] {m}"))  # fmt: skip
        t0 = time.perf_counter()
        scenario = run.prepare()
        T = scenario.num_tasks
        out["tasks"] = T
        if shape == "per-task":
            for t in range(T):
                run.train(upto=t + 1)
                score_tune(str(run.dir), t, tc=tc)
        else:
            if shape == "shared-base":
                status = adopt_base(out["base_dir"], run, later)
                assert status == "shared", status
            run.train(score_fn=_Score(tc))
        wall = time.perf_counter() - t0
        log(f"{shape}: {wall:.0f}s for {T} tasks ({3600 / wall:.1f} trials/hour per slot)")
        return wall

    out["one-run"] = run_shape("one-run")
    t0 = time.perf_counter()
    out["base_dir"] = str(train_base(_trial_job(job, root / "base", f"{job.name}-base", shards),
                                     later, tc.protocol, log=log))  # fmt: skip
    out["base_s"] = time.perf_counter() - t0
    out["shared-base"] = run_shape("shared-base")
    out["per-task"] = run_shape("per-task")
    return out


class _Score:
    """A picklable score_fn: the tuning metrics after task t (no Tune session here)."""

    def __init__(self, tc):
        self.tc = tc

    def __call__(self, run_dir: str, t: int) -> dict:
        from distcl.tune.trial import score_tune

        return score_tune(run_dir, t, tc=self.tc)


def main(argv: list[str] | None = None) -> int:
    from distcl.config import load_job

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--root", default="runs/tune-shape")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    job = load_job(args.job, overrides=args.set)
    res = measure(job, Path(args.root).resolve())
    res["settings"] = args.set
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
