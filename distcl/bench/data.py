"""``distcl bench data``: shard building throughput, one Ray task per shard with 1, 2 and 4
tasks in flight, against the single-process writer, on the same data in one run.

    distcl bench data                                  # Fashion-MNIST if installed, else synthetic
    distcl bench data --per-class 600 --shard-size 250 --format jpeg --json
    distcl bench data --out s3://my-bucket/bench      # write where the jobs will: a bucket, NFS

Every variant writes the same planned shards (:func:`distcl.data.shards.plan_shards`) into
its own folder; the bench checks that all of them wrote byte-identical shards. Ray's worker
processes are warmed up first (each opens the source once and keeps it), so the figures are
steady-state throughput; the one-off start-up is reported apart. Per-sample cost =
seconds per sample of one process (the serial writer), and of the encoder alone. ``--out``
writes the shards under a folder or object-store URI of your choice (a fresh sub-folder,
deleted afterwards) instead of a local temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid


def _job(root: str, per_class: int, shard_size: int, fmt: str, source: str):
    from distcl.config import parse_job

    data = {"source": source, "shard_size": shard_size, "image_format": fmt}
    if source == "synthetic":
        data.update(synthetic_classes=10, synthetic_train_per_class=per_class,
                    synthetic_test_per_class=max(1, per_class // 5), synthetic_size=28)  # fmt: skip
    else:
        data.update(train_per_class=per_class, test_per_class=max(1, per_class // 5))
    raw = {"name": "bench-data", "data": data, "scenario": {"tasks": 5}, "output": {"root": root}}
    return parse_job(raw, "<bench data>")


def run_data_bench(
    per_class: int = 600,
    shard_size: int = 250,
    fmt: str = "png",
    tasks: tuple[int, ...] = (1, 2, 4),
    rounds: int = 2,
    log=print,
    out: str | None = None,
) -> dict:
    import ray

    from distcl import storage
    from distcl.data import shards as sh
    from distcl.data.scenario import build_scenario
    from distcl.data.shards import encode_image
    from distcl.data.sources import DataError, fashion_mnist_root
    from distcl.localray import init_ray

    try:
        fashion_mnist_root(None)
        source = "fashion-mnist"
    except DataError:
        source = "synthetic"
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        job = _job(tmp, per_class, shard_size, fmt, source)
        root = storage.join(out, f"bench-data-{uuid.uuid4().hex[:8]}") if out else tmp
        data = sh._portable_data(job.data)
        src = sh._cached_source(data, job.seed)  # opened once here, as each worker does
        scen = build_scenario(src.train_labels, src.test_labels, job.scenario, job.seed,
                              job.data.train_per_class, job.data.test_per_class)  # fmt: skip
        plans = sh.plan_shards(scen, shard_size)
        n = sum(len(p.indices) for p in plans)
        log(f"bench data: {source}, {n} samples in {len(plans)} shards of <= {shard_size}, {fmt}")

        t0 = time.process_time()
        for p in plans[:2]:
            for i in p.indices:
                encode_image(src.image(p.source_split, int(i)), fmt)
        k = sum(len(p.indices) for p in plans[:2])
        encode_s = (time.process_time() - t0) / max(k, 1)  # CPU seconds per sample

        def timed(name: str, write) -> tuple[float, float, list[dict]]:
            """Wall seconds, CPU seconds (this process + the Ray tasks), entries."""
            where = storage.join(root, name)
            storage.delete_dir(where)
            storage.makedirs(where)
            task_cpu.clear()
            t, cpu = time.perf_counter(), time.process_time()
            entries = write(str(where))
            cpu = time.process_time() - cpu + sum(task_cpu.values())
            return time.perf_counter() - t, cpu, entries

        task_cpu: dict[str, float] = {}

        t = time.perf_counter()
        started = not ray.is_initialized()
        init_ray(num_cpus=max(max(tasks), os.cpu_count() or 1))
        storage.makedirs(root)
        ref = sh.write_shards_serial(plans, str(root), data, job.seed, fmt)
        warm = sh.write_shards_ray(plans[: max(tasks)], str(root), data,
                                   job.seed, fmt, parallel=max(tasks))  # fmt: skip
        startup_s = time.perf_counter() - t
        identical = warm == ref[: len(warm)]
        # Interleaved rounds, best of each: on a shared machine, load comes and goes.
        best: dict = {}
        best_cpu: dict = {}
        for r in range(rounds):
            variants = [("serial", lambda o: sh.write_shards_serial(plans, o, data, job.seed, fmt))]
            variants += [
                (k, lambda o, k=k: sh.write_shards_ray(
                    plans, o, data, job.seed, fmt, parallel=k, task_cpu=task_cpu))
                for k in tasks
            ]  # fmt: skip
            for key, write in variants:
                secs, cpu, entries = timed(str(key), write)
                identical &= entries == ref
                best[key] = min(best.get(key, secs), secs)
                best_cpu[key] = min(best_cpu.get(key, cpu), cpu)
                log(f"  round {r + 1}: {key}: {secs:.1f}s wall, {cpu:.1f}s CPU")
        serial_s, serial_cpu = best.pop("serial"), best_cpu.pop("serial")
        ray_s = best
        if out:
            storage.delete_dir(root)
        if started:
            ray.shutdown()
    return {
        "source": source, "format": fmt, "out": out or "local temporary folder", "samples": n,
        "shards": len(plans),
        "shard_size": shard_size, "cores": os.cpu_count(), "ray_startup_s": startup_s,
        "rounds": rounds, "load_avg_1min": os.getloadavg()[0],
        "serial_samples_per_s": n / serial_s, "serial_ms_per_sample": 1e3 * serial_s / n,
        "encode_ms_per_sample": 1e3 * encode_s,
        "serial_cpu_ms_per_sample": 1e3 * serial_cpu / n,
        "ray_cpu_ms_per_sample": {k: 1e3 * c / n for k, c in best_cpu.items()},
        "ray_samples_per_s": {k: n / s for k, s in ray_s.items()},
        "ray_speedup_vs_serial": {k: serial_s / s for k, s in ray_s.items()},
        "ray_ms_per_sample_one_task": 1e3 * ray_s[tasks[0]] / n,
        "byte_identical": identical,
    }  # fmt: skip


def format_data_bench(r: dict) -> str:
    lines = [
        f"distcl bench data ({r['source']}, {r['samples']} samples, {r['shards']} shards of "
        f"<= {r['shard_size']}, {r['format']}, {r['cores']} cores, best of {r['rounds']} "
        f"rounds, load average {r['load_avg_1min']:.1f}; written to {r['out']})",
        f"  single process (serial writer): {r['serial_samples_per_s']:9.0f} samples/s "
        f"(wall {r['serial_ms_per_sample']:.3f} ms/sample; CPU "
        f"{r['serial_cpu_ms_per_sample']:.3f} ms/sample, of which encoding "
        f"{r['encode_ms_per_sample']:.3f} ms)",
    ]
    for k, v in r["ray_samples_per_s"].items():
        lines.append(
            f"  {k} Ray task(s) in flight:       {v:9.0f} samples/s "
            f"(x{r['ray_speedup_vs_serial'][k]:.2f} vs serial; CPU "
            f"{r['ray_cpu_ms_per_sample'][k]:.3f} ms/sample, driver + tasks)"
        )
    lines += [
        f"  Ray start-up + warm-up (once):  {r['ray_startup_s']:9.1f} s",
        f"  shards byte-identical across all variants: {'yes' if r['byte_identical'] else 'NO'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="distcl bench data", description=__doc__)
    p.add_argument("--per-class", type=int, default=600, help="training items per class")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--format", choices=["png", "jpeg"], default="png")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best of each")
    p.add_argument("--out", help="write the shards under this folder or s3:// / gs:// URI")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run_data_bench(a.per_class, a.shard_size, a.format, rounds=a.rounds,
                       log=lambda *x: None, out=a.out)  # fmt: skip
    print(json.dumps(r, indent=2) if a.json else format_data_bench(r))
