"""``distcl bench sequence``: the per-task overhead of a long task sequence, old shape vs new.

One synthetic sequence of ``--tasks`` small tasks (one class each, 1 epoch), trained twice
in ONE run of this benchmark on the same local Ray:

- **per-task runs** (the old shape): one Ray Train run per task (``Run.train(upto=t + 1)``
  for t = 0..T-1), paying Train's start-up at every task;
- **one run** (the new shape): one Ray Train run for the whole sequence (``Run.train()``).

For each: the wall time, the time inside training steps (the histories' ``epoch_s``), the
overhead per task = (wall - training) / T, and its growth (mean overhead of the last half
of the tasks against the first half, from the per-task wall times of the per-task runs and
the per-task ``train_s + end_task_s`` of the one run). Also the overhead as a fraction of
a task's training time, and, for the one run, where each task's time outside its training
steps went (rank 0's clock): preparing (method, old model, replay snapshot, DDP wrap),
the epochs' checkpoints, saving the model, the end-of-task work, the task's report (it
waits until Train's controller takes the previous one), and the rest; and once per run,
Train's start-up (controller, worker processes, process group), the workers' set-up and
the shut-down.

Run: ``distcl bench sequence [--tasks 20] [--workers 2]`` (minutes: the old shape is slow).
``--job FILE`` runs a real job (its data, model, method and workers; ``--tasks`` and
``--workers`` are then the job's) in both shapes instead, e.g. the quickstart: the old
shape's wall time against the new one's, and each task's end-of-task time as a fraction
of its training time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from distcl.config import load_job, parse_job, to_dict


def _job(root: str, name: str, tasks: int, workers: int, job_file: str | None = None,
         method: str = "finetune"):  # fmt: skip
    if job_file:  # a real job, renamed per shape, under the benchmark's temp root
        raw = to_dict(load_job(job_file))
        raw.pop("tune", None)
        raw.update(name=name, output={**raw["output"], "root": root})
        return parse_job(raw, job_file)
    raw = {
        "name": name, "seed": 0,
        "data": {"source": "synthetic", "synthetic_classes": tasks,
                 "synthetic_train_per_class": 64, "synthetic_test_per_class": 8,
                 "synthetic_size": 16, "shard_size": 64},
        "scenario": {"setup": "disjoint", "tasks": tasks},
        "model": {"embedding_dim": 16}, "method": {"name": method},
        "memory": {"per_class": 4},
        "train": {"epochs": 1, "batch_size_per_worker": 16, "workers": workers,
                  "use_gpu": "no", "threads_per_worker": 1},
        "output": {"root": root},
    }  # fmt: skip
    return parse_job(raw, "<bench sequence>")


def _train_s(run) -> list[float]:
    """Seconds inside training steps, per task (from the saved histories)."""
    return [
        sum(h["epoch_s"] for h in json.loads((run.rd.model(t) / "history.json").read_text()))
        for t in range(run.scenario.num_tasks)
    ]


def run_sequence_bench(tasks: int = 20, workers: int = 2, log=print,
                       job_file: str | None = None, shapes=("per_task", "one_run"),
                       method: str = "finetune") -> dict:  # fmt: skip
    from distcl.train.driver import Run, init_ray

    init_ray(num_cpus=max(2, workers))
    out = {"tasks": tasks, "workers": workers, "job": job_file or f"synthetic {method}"}
    with tempfile.TemporaryDirectory() as root:
        for shape in shapes:
            job = _job(root, shape, tasks, workers, job_file, method)
            run = Run(job, progress=False, log=lambda *a: None)
            run.prepare()
            tasks = out["tasks"] = run.scenario.num_tasks
            out["workers"] = job.train.workers
            walls, ends = [], []
            t0 = time.perf_counter()
            if shape == "per_task":
                for t in range(tasks):
                    t1 = time.perf_counter()
                    run.train(upto=t + 1)
                    walls.append(time.perf_counter() - t1)
            else:
                result = run.train()
                timings = result["tasks"]
                ends = [timings[t]["end_task_s"] / timings[t]["train_s"] for t in range(tasks)]
            wall = time.perf_counter() - t0
            train = _train_s(run)
            if shape == "one_run":  # each task's wall: its training, end-of-task and report
                out["breakdown"] = [_breakdown(timings[t], s) for t, s in enumerate(train)]
                out["run_overhead"] = result.get("run_overhead", {})
                walls = [b["wall_s"] for b in out["breakdown"]]
            per_task = [w - s for w, s in zip(walls, train, strict=True)]  # overhead per task
            half, ten = tasks // 2, min(10, tasks // 2)
            first, last = float(np.mean(per_task[:ten])), float(np.mean(per_task[-ten:]))
            out[shape] = {
                "wall_s": wall, "train_s": sum(train),
                "overhead_per_task_s": (wall - sum(train)) / tasks,
                "overhead_vs_training": (wall - sum(train)) / sum(train),
                "wall_vs_steps": wall / sum(train),
                "in_task_overhead_first_half_s": float(np.mean(per_task[:half])),
                "in_task_overhead_last_half_s": float(np.mean(per_task[half:])),
                "in_task_overhead_first10_s": first, "in_task_overhead_last10_s": last,
                "overhead_growth": last / first - 1,
                "in_task_overhead_s": per_task,
            }  # fmt: skip
            if ends:  # the one run: each task's end-of-task work against its training
                out[shape]["end_task_vs_train"] = ends
            log(f"{shape}: {json.dumps(out[shape])}")
    if "per_task" in out and "one_run" in out:
        out["wall_ratio_one_run_vs_per_task"] = (out["one_run"]["wall_s"]
                                                 / out["per_task"]["wall_s"])  # fmt: skip
    return out


PARTS = ("prepare_s", "checkpoint_s", "save_s", "end_task_s", "report_s")


def _breakdown(timing: dict, steps: float) -> dict:
    """One task of the one run: its training steps and every part of the rest (seconds)."""
    out = {"steps_s": steps, **{k: timing.get(k, 0.0) for k in PARTS}}
    total = timing["train_s"] + timing["end_task_s"] + timing["report_s"]
    out["other_s"] = total - sum(out.values())  # seeding, the epochs' progress messages, ...
    out["wall_s"] = total
    out["overhead_vs_steps"] = (total - steps) / steps
    return out


def format_sequence_bench(r: dict) -> str:
    lines = [f"distcl bench sequence ({r['job']}: {r['tasks']} tasks, {r['workers']} workers)"]
    for shape, title in (("per_task", "one Train run per task"), ("one_run", "one Train run")):
        if shape not in r:
            continue
        s = r[shape]
        lines.append(
            f"  {title:24s} wall {s['wall_s']:7.1f} s, training {s['train_s']:6.1f} s, "
            f"overhead {s['overhead_per_task_s']:5.2f} s/task "
            f"({100 * s['overhead_vs_training']:.0f} % of training); in-task overhead "
            f"{s['in_task_overhead_first_half_s']:.2f} s (first half) -> "
            f"{s['in_task_overhead_last_half_s']:.2f} s (last half)"
        )
        lines.append(
            f"  {'':24s} in-task overhead, first 10 tasks {s['in_task_overhead_first10_s']:.2f} s"
            f" -> last 10 {s['in_task_overhead_last10_s']:.2f} s: growth "
            f"{100 * s['overhead_growth']:+.1f} % (goal < 10 %); wall / training steps "
            f"{s['wall_vs_steps']:.2f} (moonshot <= 1.1)"
        )  # fmt: skip
    if "end_task_vs_train" in r.get("one_run", {}):
        fr = " ".join(f"{100 * x:.0f}" for x in r["one_run"]["end_task_vs_train"])
        lines.append(f"  one run, end-of-task / training time per task (%): {fr}")
    if "wall_ratio_one_run_vs_per_task" in r:
        lines.append(f"  wall, one run / per-task runs: {r['wall_ratio_one_run_vs_per_task']:.3f}")
    if r.get("run_overhead"):
        o = r["run_overhead"]
        lines.append(f"  one run, once per run (s): Train start-up {o['startup_s']:.2f}, worker "
                     f"set-up {o['setup_s']:.2f}, shut-down {o['shutdown_s']:.2f}")  # fmt: skip
    if r.get("breakdown"):
        lines.append("  one run, per task (s): steps | prepare checkpoints save end-of-task "
                     "report other | overhead / steps")  # fmt: skip
        for t, b in enumerate(r["breakdown"]):
            rest = " ".join(f"{b[k]:6.2f}" for k in (*PARTS, "other_s"))
            lines.append(f"    task {t:2d}: {b['steps_s']:7.2f} | {rest} | "
                         f"{100 * b['overhead_vs_steps']:5.1f} %")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="distcl bench sequence", description=__doc__)
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--job", metavar="FILE", help="a real job instead of the synthetic sequence")
    p.add_argument("--method", default="finetune", help="the synthetic sequence's method "
                   "(cl2r: with its memory service)")  # fmt: skip
    p.add_argument(
        "--one-run-only",
        action="store_true",
        help="skip the old shape (one Train run per task: slow at 50 tasks)",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    shapes = ("one_run",) if a.one_run_only else ("per_task", "one_run")
    r = run_sequence_bench(a.tasks, a.workers, log=lambda *x: None if a.json else print(*x),
                           job_file=a.job, shapes=shapes, method=a.method)  # fmt: skip
    print(json.dumps(r, indent=1) if a.json else format_sequence_bench(r))
