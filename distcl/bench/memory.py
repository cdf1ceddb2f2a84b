"""``distcl bench memory``: what replay from the memory actor costs a training step.

Measured in ONE run against a live ``MemoryStore`` actor on a local Ray (started here with
``num_cpus=2`` unless Ray is already initialised):

(a) the mean time of a small training step (tiny conv net, forward + backward + SGD step on a
    batch of ``batch_size`` in-memory tensors) with no replay, against the same step whose batch
    takes ``replay_fraction`` of its rows from replay batches drawn through ``ReplayPrefetcher``
    (and, for reference, fetched synchronously with no prefetch). The steps are interleaved
    (plain, prefetched, synchronous, plain, ...) so drift hits every variant alike; the overhead
    is ``(t_replay - t_plain) / t_plain``.
(b) the actor's throughput (samples/s) with 2 concurrent reader tasks, each a prefetcher.

Run: ``distcl bench memory``, or from Python::

    from distcl.bench.memory import format_memory_bench, run_memory_bench
    print(format_memory_bench(run_memory_bench()))

On a cluster, run it on a node with the workers' hardware.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from distcl.memory.service import (
    ReplayPrefetcher,
    create_memory_service,
    kill_memory_service,
)


def _tiny_net(channels: int, n_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, n_classes),
    )


@ray.remote(num_cpus=1)
def _reader(actor: Any, batch_size: int, seed: int, calls: int) -> tuple[float, float, int]:
    """One replay consumer: ``calls`` batches through a prefetcher; (start, end, samples)."""
    prefetch = ReplayPrefetcher(actor, batch_size, seed, depth=2)
    prefetch.next()  # first round trip (connection, deserialiser) outside the window
    t0 = time.time()
    n = sum(len(prefetch.next()["labels"]) for _ in range(calls))
    t1 = time.time()
    prefetch.close(wait=True)
    return t0, t1, n


def run_memory_bench(
    steps: int = 50,
    batch_size: int = 128,
    replay_fraction: float = 0.5,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    seed: int = 0,
    n_classes: int = 10,
    per_class: int = 50,
    reader_calls: int = 200,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns plain numbers (ms, fractions, /s)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < replay_fraction < 1.0:
        raise ValueError(f"replay_fraction must be in (0, 1), got {replay_fraction}")
    n_replay = int(round(batch_size * replay_fraction))
    if not 0 < n_replay < batch_size:
        raise ValueError(
            f"batch_size={batch_size} with replay_fraction={replay_fraction} leaves no room "
            "for both current and replay rows"
        )
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    run_name = f"bench-{uuid.uuid4().hex[:8]}"
    path = tempfile.mkdtemp(prefix="distcl-bench-memory-")
    try:
        actor = create_memory_service(run_name, path, per_class=per_class, seed=seed)
        rng = np.random.default_rng(seed)
        n_mem = n_classes * per_class
        ray.get(
            actor.commit.remote(
                0,
                [f"item{i}" for i in range(n_mem)],
                rng.integers(0, 256, (n_mem, *image_shape), dtype=np.uint8),  # (M, C, H, W)
                np.repeat(np.arange(n_classes), per_class),
                rng.normal(size=(n_mem, 64)).astype(np.float32),
            )
        )

        torch.manual_seed(seed)
        model = _tiny_net(image_shape[0], n_classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        cur_x = torch.rand(batch_size, *image_shape)  # (B, C, H, W), the current task's batch
        cur_y = torch.randint(0, n_classes, (batch_size,))
        n_cur = batch_size - n_replay

        def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        def with_replay(batch: dict) -> None:
            # np.array: Ray's arrays are read-only views (the prefetcher copies too).
            rx = torch.from_numpy(np.array(batch["images"])).float().div_(255.0)  # (R, C, H, W)
            ry = torch.from_numpy(np.array(batch["labels"]))
            train_step(torch.cat([cur_x[:n_cur], rx]), torch.cat([cur_y[:n_cur], ry]))

        prefetch = ReplayPrefetcher(actor, n_replay, seed, depth=2)
        sync_counter = iter(range(10**9))
        variants = {
            "plain": lambda: train_step(cur_x, cur_y),
            "replay": lambda: with_replay(prefetch.next()),
            "replay_sync": lambda: with_replay(
                ray.get(actor.sample.remote(n_replay, next(sync_counter)))
            ),
        }
        for fn in variants.values():  # warm-up: allocator, autograd graph, actor round trip
            for _ in range(3):
                fn()
        prefetch.wait_s = 0.0
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(steps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        prefetch_wait_ms = 1e3 * prefetch.wait_s / steps
        prefetch.close(wait=True)

        # (b) two concurrent readers; a first round starts their worker processes.
        ray.get([_reader.remote(actor, n_replay, seed + r, 2) for r in range(2)])
        spans = ray.get([_reader.remote(actor, n_replay, seed + r, reader_calls) for r in range(2)])
        window = max(s[1] for s in spans) - min(s[0] for s in spans)
        total = sum(s[2] for s in spans)
    finally:
        kill_memory_service(run_name)
        shutil.rmtree(path, ignore_errors=True)
        if started_ray:
            ray.shutdown()

    ms = {k: 1e3 * float(np.mean(v)) for k, v in times.items()}
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    return {
        "steps": steps,
        "batch_size": batch_size,
        "replay_rows": n_replay,
        "image_shape": tuple(image_shape),
        "memory_items": n_mem,
        "torch_threads": torch.get_num_threads(),
        "step_ms_plain": ms["plain"],
        "step_ms_replay": ms["replay"],
        "step_ms_replay_sync": ms["replay_sync"],
        "step_ms_median_plain": med["plain"],
        "step_ms_median_replay": med["replay"],
        "step_ms_median_replay_sync": med["replay_sync"],
        "replay_overhead": (ms["replay"] - ms["plain"]) / ms["plain"],
        "replay_sync_overhead": (ms["replay_sync"] - ms["plain"]) / ms["plain"],
        "replay_overhead_median": (med["replay"] - med["plain"]) / med["plain"],
        "prefetch_wait_ms": prefetch_wait_ms,
        "readers": 2,
        "reader_batch": n_replay,
        "reader_samples": total,
        "reader_window_s": window,
        "actor_samples_per_s": total / window,
        "reader_samples_per_s": [s[2] / (s[1] - s[0]) for s in spans],
    }


def format_memory_bench(result: dict[str, Any]) -> str:
    """A short human-readable report of ``run_memory_bench``'s result."""
    r = result
    return "\n".join(
        [
            f"memory bench: {r['steps']} steps, batch {r['batch_size']} "
            f"({r['replay_rows']} replay rows), images {r['image_shape']}, "
            f"{r['memory_items']} exemplars, torch threads {r['torch_threads']}",
            f"  step, no replay           {r['step_ms_plain']:8.2f} ms "
            f"(median {r['step_ms_median_plain']:.2f})",
            f"  step, prefetched replay   {r['step_ms_replay']:8.2f} ms "
            f"(median {r['step_ms_median_replay']:.2f})  overhead {r['replay_overhead']:+.1%} "
            f"(of medians {r['replay_overhead_median']:+.1%}), "
            f"waiting on actor {r['prefetch_wait_ms']:.2f} ms/step",
            f"  step, synchronous replay  {r['step_ms_replay_sync']:8.2f} ms "
            f"(median {r['step_ms_median_replay_sync']:.2f})  "
            f"overhead {r['replay_sync_overhead']:+.1%}",
            f"  actor throughput, {r['readers']} readers x batch {r['reader_batch']}: "
            f"{r['actor_samples_per_s']:,.0f} samples/s "
            f"(per reader {', '.join(f'{v:,.0f}' for v in r['reader_samples_per_s'])})",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """``distcl bench memory [--steps N] [--batch-size B] [--json]``."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="distcl bench memory", description=__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--replay-fraction", type=float, default=0.5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run_memory_bench(steps=a.steps, batch_size=a.batch_size, replay_fraction=a.replay_fraction)
    print(json.dumps(r, indent=1, default=str) if a.json else format_memory_bench(r))
