"""``distcl bench NAME [options]``: speed and memory targets as ratios against a baseline
measured in the same run (never timed assertions in tests).

    distcl bench train    # Ray Train + WebDataset + DDP vs an in-memory single-process loop
    distcl bench search   # distcl search vs raw faiss IndexFlatIP vs numpy; IVF recall
    distcl bench eval     # cost of the T x T evaluation: embedding passes and seconds
    distcl bench memory   # replay overhead per step (local sampling from a per-task snapshot)
    distcl bench sequence # per-task overhead of a long sequence: one Train run vs one per task
    distcl bench data     # shard building throughput: 1, 2, 4 Ray tasks vs one process
    distcl bench controller  # a Train run's controller: Ray's stock TorchTrainer vs distcl's
    distcl bench backfill # a whole backfilling curve against one engine pass of the same pair
    distcl bench transform  # FCT's h applied to a stored gallery against one read pass
"""

from __future__ import annotations

import importlib

BENCHES = {
    "train": "train", "search": "search", "eval": "evalcost", "memory": "memory",
    "sequence": "sequence", "data": "data", "controller": "controller",
    "backfill": "backfill", "transform": "transform",
}  # fmt: skip


def run_bench(name: str, argv: list[str]) -> int:
    module = importlib.import_module(f"distcl.bench.{BENCHES[name]}")
    module.main(list(argv))
    return 0
