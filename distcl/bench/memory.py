"""``distcl bench memory``: what replay from the episodic memory costs a training step.

The engine takes the memory once per task (``MemoryService.snapshot``: one call per shard)
and samples replay rows locally (``BalancedSampler``), so a step pays no actor round trip.
Measured in ONE run against live memory shards on a local Ray (``num_cpus=2`` unless Ray is
already initialised):

(a) the mean time of a training step (forward + backward + SGD step on ``batch_size``
    in-memory rows; a tiny conv net, or ``--backbone resnet32`` as the Fashion-MNIST jobs
    train, at their batch 32 and 1-channel 28x28 images) without replay, against the same
    step whose batch also takes ``replay_fraction`` rows sampled locally from the snapshot;
    the steps alternate so drift hits both alike; overhead = ``(t_replay - t_plain) /
    t_plain`` (the added rows' own compute included, as in training);
(b) the sampling alone (``BalancedSampler.sample`` + the uint8 row gather, no compute):
    the memory's own cost per step, as a fraction of the plain step;
(c) the snapshot's time, once per task, against ``steps_per_task`` plain steps.

Run: ``distcl bench memory [--shards 2] [--backbone resnet32]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import uuid
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from distcl.memory.selection import BalancedSampler
from distcl.memory.service import create_memory_service, kill_memory_service


def _tiny_net(channels: int, n_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, n_classes),
    )  # fmt: skip


def _net(backbone: str | None, channels: int, n_classes: int) -> nn.Module:
    if backbone is None:
        return _tiny_net(channels, n_classes)
    from distcl.models.backbones import build_backbone

    body, dim = build_backbone(backbone, channels, small_input=True)
    return nn.Sequential(body, nn.Linear(dim, n_classes))


def run_memory_bench(
    classes: int = 50, per_class: int = 20, image: tuple[int, int, int] = (3, 32, 32),
    batch_size: int = 64, replay_fraction: float = 0.5, steps: int = 60,
    steps_per_task: int = 500, shards: int = 2, seed: int = 0, backbone: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the benchmark (see the module docstring); returns plain numbers."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(1)
    path = tempfile.mkdtemp(prefix="distcl-bench-memory-")
    svc = create_memory_service(f"bench-{uuid.uuid4().hex[:8]}", path, per_class=per_class,
                                seed=seed, shards=shards)  # fmt: skip
    try:
        rng = np.random.default_rng(seed)
        n = classes * per_class
        labels = np.repeat(np.arange(classes), per_class)
        images = rng.integers(0, 256, (n, *image), dtype=np.uint8)
        svc.commit(0, [f"i{i}" for i in range(n)], images, labels,
                   rng.normal(size=(n, 16)).astype(np.float32), classes_seen=classes)  # fmt: skip
        t0 = time.perf_counter()
        snap = svc.snapshot()
        snapshot_s = time.perf_counter() - t0
        n_mem = max(1, round(batch_size * replay_fraction / (1 - replay_fraction)))
        net = _net(backbone, image[0], classes)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        x = torch.rand(batch_size, *image)
        y = torch.randint(0, classes, (batch_size,))

        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()

        sampler = BalancedSampler(snap["labels"])

        def sample() -> tuple[np.ndarray, np.ndarray]:  # what the engine adds per step
            rows = sampler.sample(n_mem, rng)
            return snap["images"][rows], snap["labels"][rows]

        times: dict[str, list[float]] = {"plain": [], "replay": [], "sample": []}
        for i in range(steps + 5):
            t0 = time.perf_counter()
            step(x, y)
            t1 = time.perf_counter()
            mx, my = sample()
            t2 = time.perf_counter()
            mx = torch.from_numpy(mx).float().div_(255.0)  # as the engine converts its batch
            step(torch.cat([x, mx]), torch.cat([y, torch.from_numpy(my)]))
            t3 = time.perf_counter()
            if i >= 5:  # warm-up steps are not timed
                times["plain"].append(t1 - t0)
                times["sample"].append(t2 - t1)
                times["replay"].append(t3 - t1)
        mean = {k: float(np.mean(v)) for k, v in times.items()}
        return {
            "shards": shards, "memory_rows": len(snap["labels"]), "batch_size": batch_size,
            "net": backbone or "tiny conv net", "image": list(image),
            "replay_rows": n_mem, "step_plain_ms": 1e3 * mean["plain"],
            "step_replay_ms": 1e3 * mean["replay"], "sample_ms": 1e3 * mean["sample"],
            "replay_overhead": (mean["replay"] - mean["plain"]) / mean["plain"],
            "sampling_overhead": mean["sample"] / mean["plain"],
            "snapshot_s": snapshot_s,
            "snapshot_vs_task": snapshot_s / (steps_per_task * mean["plain"]),
        }  # fmt: skip
    finally:
        kill_memory_service(svc)
        shutil.rmtree(path, ignore_errors=True)


def format_memory_bench(r: dict[str, Any]) -> str:
    return "\n".join([
        f"distcl bench memory ({r['memory_rows']} exemplars on {r['shards']} shards, "
        f"{r['net']}, images {'x'.join(map(str, r['image']))}, "
        f"batch {r['batch_size']} + {r['replay_rows']} replayed rows)",
        f"  plain step:                         {r['step_plain_ms']:8.2f} ms",
        f"  step with local replay:             {r['step_replay_ms']:8.2f} ms "
        f"(+{100 * r['replay_overhead']:.1f} %, the replayed rows' compute included)",
        f"  sampling alone (memory's own cost): {r['sample_ms']:8.3f} ms "
        f"({100 * r['sampling_overhead']:.2f} % of a plain step)",
        f"  snapshot, once per task:            {r['snapshot_s']:8.3f} s "
        f"({100 * r['snapshot_vs_task']:.2f} % of 500 plain steps)",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="distcl bench memory", description=__doc__)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument(
        "--backbone",
        help="a distcl backbone (resnet32: the Fashion-MNIST jobs' "
        "step, batch 32, 1x28x28 images); default: a tiny conv net, batch 64, 3x32x32",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    kw = {"backbone": a.backbone, "batch_size": 32, "image": (1, 28, 28)} if a.backbone else {}
    r = run_memory_bench(shards=a.shards, steps=a.steps, **kw)
    print(json.dumps(r, indent=1) if a.json else format_memory_bench(r))
