"""``distcl bench train``: images/s of the full training path against a plain loop.

Full path: Ray Train ``TorchTrainer`` with N gloo DDP workers (1 thread each), streaming
WebDataset shards, the engine's loop and loss. Baseline, measured in the same run: one
process with N threads, the same model, the same global batch, in-memory uint8 tensors,
plain cross-entropy. Both exclude start-up; the full path's start-up (worker group,
process group, model build) is reported on its own.

    distcl bench train [--job jobs/quickstart.yaml] [--epochs 2] [--workers 2]
                       [--loader-workers N]   # DataLoader processes per worker (default 0)

With ``--loader-workers 1 --workers 1`` on 2 cores, decoding overlaps the training step on
the second core; the baseline stays one process with ``workers`` threads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch


def baseline_images_per_s(
    job,
    num_classes: int,
    in_channels: int,
    images: np.ndarray,
    labels: np.ndarray,
    global_batch: int,
    steps: int,
    threads: int,
) -> float:
    """Single process, in-memory tensors, same model and batch: images/s after warm-up."""
    from distcl import losses
    from distcl.train.modeling import build_model

    torch.set_num_threads(threads)
    model = build_model(job, num_classes, in_channels)
    opt = torch.optim.SGD(model.parameters(), lr=job.train.lr, momentum=0.9)
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    rng = np.random.default_rng(0)

    def step():
        idx = torch.from_numpy(rng.integers(0, len(x_all), global_batch))
        x = x_all[idx].float().div_(255.0)
        out = model(x)
        loss = losses.cross_entropy(out["logits"], y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * global_batch / (time.perf_counter() - t0)


def run_train_bench(
    job_path: str = "jobs/quickstart.yaml",
    epochs: int = 2,
    workers: int = 2,
    loader_workers: int = 0,
    log=print,
) -> dict:
    from distcl.config import load_job
    from distcl.data.readers import load_arrays
    from distcl.train.driver import Run, init_ray

    with tempfile.TemporaryDirectory() as tmp:
        job = load_job(job_path, overrides=[
            "method.name=finetune", "method.params={}", f"train.epochs={epochs}",
            f"train.first_task_epochs={epochs}", f"train.workers={workers}",
            "train.threads_per_worker=1", "train.augment=false", f"output.root={tmp}",
            "scenario.max_tasks=1", f"train.loader_workers={loader_workers}",
            f"train.cpus_per_worker={1 + loader_workers}",
        ])  # fmt: skip
        init_ray(num_cpus=workers * (1 + loader_workers))
        run = Run(job, progress=False, log=lambda *a: None)
        run.prepare()
        t0 = time.perf_counter()
        run.train(upto=1)
        wall = time.perf_counter() - t0  # end-of-task embedding included in the start-up
        history = json.loads((run.rd.model(0) / "history.json").read_text())
        full = float(np.median([h["new_images_per_s"] for h in history]))
        train_s = sum(h["epoch_s"] for h in history)
        keys, images, labels, _ = load_arrays(run.plan(1).tasks[0].train_paths)
        global_batch = job.train.batch_size_per_worker * workers
        steps = max(10, int(sum(h["epoch_s"] for h in history[-1:]) * full / global_batch))
        base = baseline_images_per_s(
            job,
            run.num_classes,
            run.in_channels,
            images,
            labels,
            global_batch,
            min(steps, 40),
            threads=workers,
        )
    result = {
        "workers": workers, "loader_workers": loader_workers, "global_batch": global_batch,
        "epochs": epochs,
        "full_path_images_per_s": full, "baseline_images_per_s": base,
        "ratio_full_vs_baseline": full / base,
        "full_path_wall_s": wall, "full_path_train_s": train_s,
        "full_path_startup_s": wall - train_s,
    }  # fmt: skip
    return result


def format_train_bench(r: dict) -> str:
    return "\n".join([
        f"distcl bench train ({r['workers']} workers, {r['loader_workers']} loader workers "
        f"each, global batch {r['global_batch']})",
        f"  full path (Ray Train + shards + DDP): {r['full_path_images_per_s']:8.1f} img/s",
        f"  baseline (1 process, in-memory):      {r['baseline_images_per_s']:8.1f} img/s",
        f"  ratio full / baseline:                {r['ratio_full_vs_baseline']:8.3f}",
        f"  start-up of the full path:            {r['full_path_startup_s']:8.1f} s "
        f"(wall {r['full_path_wall_s']:.1f} s, training {r['full_path_train_s']:.1f} s)",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="distcl bench train", description=__doc__)
    p.add_argument("--job", default="jobs/quickstart.yaml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-workers", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run_train_bench(a.job, a.epochs, a.workers, a.loader_workers)
    print(json.dumps(r, indent=1) if a.json else format_train_bench(r))
