"""``distcl bench controller``: what a Train run's controller costs, Ray's stock trainer vs
distcl's, measured in the same run on the same local Ray.

- **stock**: ``ray.train.torch.TorchTrainer`` with ``TorchConfig`` (the driver imports torch,
  and so does the controller, which unpickles the torch backend config);
- **distcl**: :class:`distcl.train.trainer.Trainer` (Ray's public ``DataParallelTrainer`` with
  :class:`~distcl.train.backend.TorchBackendConfig`, which imports torch on the workers only).

Both run the same trivial 2-rank train function (a gloo all-reduce), ``--runs`` times each,
alternating. Per run: ``fit``'s wall time (start-up to end), the controller's peak resident
memory and whether torch is mapped in it (read from /proc while it lives), and the actor
processes beside the workers. The controller runs on the node of the process calling ``fit``:
a tuning search's trials each have one, so at tens of concurrent trials the difference per
controller is multiplied by the trials per node (``cluster/README.md`` states the figures).

Run: ``distcl bench controller [--runs 3] [--json]`` (a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def _collective(config: dict) -> None:
    import torch
    import torch.distributed as dist

    x = torch.ones(1)
    dist.all_reduce(x)
    time.sleep(config["hold_s"])  # the controller lives while the sampler reads it


def _controllers() -> dict[int, dict]:
    """pid -> {rss_kb, torch} of the processes titled as a Train controller."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if "TrainController" not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            status = (proc / "status").read_text()
            rss = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM")))
            torch = "libtorch" in (proc / "maps").read_text()
        except (OSError, StopIteration):
            continue
        out[int(proc.name)] = {"rss_kb": rss, "torch": torch}
    return out


def _one(kind: str, hold_s: float, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig

    from distcl.localray import scoped_env
    from distcl.train.driver import train_env

    scaling = ScalingConfig(num_workers=2, use_gpu=False)
    run_config = RunConfig(
        name=f"bench-{kind}-{time.time_ns()}",
        storage_path=storage,  # a temporary folder, removed when the bench ends
    )
    if kind == "stock":
        from ray.train.torch import TorchConfig, TorchTrainer

        trainer = TorchTrainer(_collective, train_loop_config={"hold_s": hold_s},
                               scaling_config=scaling, run_config=run_config,
                               torch_config=TorchConfig())  # fmt: skip
    else:
        from distcl.train.trainer import Trainer

        trainer = Trainer(_collective, train_loop_config={"hold_s": hold_s},
                          scaling_config=scaling, run_config=run_config)  # fmt: skip
    before = set(_controllers())
    seen: dict[int, dict] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            for pid, info in _controllers().items():
                if pid not in before:
                    prev = seen.get(pid, {"rss_kb": 0, "torch": False})
                    seen[pid] = {"rss_kb": max(prev["rss_kb"], info["rss_kb"]),
                                 "torch": prev["torch"] or info["torch"]}  # fmt: skip

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    with scoped_env(train_env()):
        trainer.fit()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    rss = max((v["rss_kb"] for v in seen.values()), default=0) / 1024
    return {"kind": kind, "wall_s": wall - hold_s, "controller_mb": rss,
            "controller_torch": any(v["torch"] for v in seen.values())}  # fmt: skip


def run_controller_bench(runs: int = 3, hold_s: float = 3.0, log=print) -> dict:
    from distcl.localray import init_ray

    init_ray(num_cpus=2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="distcl-bench-controller-") as storage:
        for i in range(runs):
            for kind in ("stock", "distcl") if i % 2 == 0 else ("distcl", "stock"):
                rows.append(_one(kind, hold_s, storage))
                log(f"run {i + 1} {kind}: {rows[-1]}")
    out = {"runs": rows}
    for kind in ("stock", "distcl"):
        mine = [r for r in rows if r["kind"] == kind]
        out[kind] = {k: sorted(r[k] for r in mine) for k in ("wall_s", "controller_mb")}
        out[kind]["controller_torch"] = any(r["controller_torch"] for r in mine)
    med = {k: {m: v[m][len(v[m]) // 2] for m in ("wall_s", "controller_mb")}
           for k, v in out.items() if k != "runs"}  # fmt: skip
    out["ratio_controller_mb"] = med["distcl"]["controller_mb"] / med["stock"]["controller_mb"]
    out["ratio_wall"] = med["distcl"]["wall_s"] / med["stock"]["wall_s"]
    return out


def format_controller_bench(r: dict) -> str:
    lines = ["| trainer | run wall s (start-up to end) | controller peak MB | torch in it |",
             "|---|---|---|---|"]  # fmt: skip
    for kind in ("stock", "distcl"):
        v = r[kind]
        lines.append(f"| {kind} | {v['wall_s'][0]:.2f}-{v['wall_s'][-1]:.2f} | "
                     f"{v['controller_mb'][0]:.0f}-{v['controller_mb'][-1]:.0f} | "
                     f"{'yes' if v['controller_torch'] else 'no'} |")  # fmt: skip
    lines.append(f"\ndistcl / stock (medians): controller memory {r['ratio_controller_mb']:.2f}, "
                 f"run wall {r['ratio_wall']:.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="distcl bench controller",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run_controller_bench(a.runs, log=(lambda *x: None) if a.json else print)
    print(json.dumps(r, indent=1) if a.json else format_controller_bench(r))
