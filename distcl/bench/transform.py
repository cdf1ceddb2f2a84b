"""``distcl bench transform``: applying FCT's h to a stored gallery against one read pass of the
same rows, in one run.

    distcl bench transform                       # 1M rows, d = 128, h of FCT's size (inner 2048)
    distcl bench transform --rows 100000 --inner 2048 --inner 512

A synthetic Parquet gallery (``distcl bench eval``'s rows of one model, 4 parts) and an h of
the FCT paper's architecture (``distcl.models.transform``: 5.71M parameters at d = 128 and
inner width 2048, BatchNorm folded), exported as the engine applies it. Each measurement runs
in a fresh subprocess:

- **read pass** (the baseline): every row read from Parquet as the engine's scan reads it
  (``iter_batches`` in record batches, the embeddings decoded);
- **transform pass**: the same read with h applied to every batch (``distcl.eval.
  transforms``, numpy, this process's BLAS threads), the rows L2-normalised;
- **GPU pass** (only where torch sees a CUDA device): the same read with h applied by torch on
  the GPU, the batch's transfer included;
- **the machine's matmul rate**: numpy on the largest layer's shape (B x 2048 by 2048 x
  2048), so the transform's time reads against what the arithmetic alone costs (h is
  ~11.4 MFLOP per row at inner 2048: a compute bound, not a read bound).

Goal (issue 32): the transform pass at most 1.5x the read pass on CPU. Reported: the ratio per
inner width, rows/s, the achieved GFLOP/s against the matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _h_arrays(dim: int, inner: int, seed: int) -> tuple[dict[str, np.ndarray], int]:
    """h's numpy export and its parameter count (the module's: the export's block-diagonal
    layer holds zeros)."""
    import torch

    from distcl.models.transform import Transformation

    torch.manual_seed(seed)
    h = Transformation(dim, dim, inner, sigma=True)
    h(torch.randn(256, dim))  # BatchNorm statistics of a batch
    return h.eval().export(), sum(p.numel() for p in h.parameters())


def flops_per_row(arrays: dict[str, np.ndarray]) -> int:
    return sum(2 * a.size for k, a in arrays.items() if k.startswith("w"))


def read_pass(store: str, with_h: str | None, batch_rows: int) -> dict:
    """One pass over the store (call in a fresh process); ``with_h``: an .npz of h."""
    from distcl.bench.evalcost import peak_rss_mb
    from distcl.eval.transforms import Transform
    from distcl.gallery.store import batch_embeddings, iter_batches, open_store

    h = None
    if with_h:
        with np.load(with_h) as z:
            h = Transform.from_arrays(z)
    t0 = time.perf_counter()
    n, check = 0, 0.0
    for rb in iter_batches(open_store(store), 0, columns=("item_id", "embedding"),
                           batch_rows=batch_rows):  # fmt: skip
        emb = batch_embeddings(rb)
        out = emb if h is None else h(emb)
        n += len(out)
        check += float(out[0, 0])
    return {"seconds": time.perf_counter() - t0, "rows": n, "peak_rss_mb": peak_rss_mb()}


def gpu_pass(store: str, with_h: str, batch_rows: int) -> dict | None:
    """The transform on a GPU (torch), read and transfer included; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    from distcl.gallery.store import batch_embeddings, iter_batches, open_store

    with np.load(with_h) as z:
        layers = [(torch.from_numpy(z[f"w{k}"]).cuda(), torch.from_numpy(z[f"b{k}"]).cuda())
                  for k in range(sum(1 for key in z.files if key.startswith("w")))]  # fmt: skip
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for rb in iter_batches(open_store(store), 0, columns=("item_id", "embedding"),
                           batch_rows=batch_rows):  # fmt: skip
        x = torch.from_numpy(batch_embeddings(rb)).cuda(non_blocking=True)
        for k, (w, b) in enumerate(layers):
            x = torch.addmm(b, x, w)
            if k + 1 < len(layers):
                x.relu_()
        out = torch.nn.functional.normalize(x, dim=1).cpu()
        n += len(out)
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "rows": n,
            "device": torch.cuda.get_device_name()}  # fmt: skip


def matmul_rate(inner: int, rows: int = 8192, repeat: int = 5) -> float:
    """GFLOP/s of numpy float32 (rows x inner) @ (inner x inner) here, best of ``repeat``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, inner), dtype=np.float32)
    b = rng.standard_normal((inner, inner), dtype=np.float32)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * rows * inner * inner / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _sub(call: str) -> dict | None:
    code = ("import json; from distcl.bench.transform import read_pass, gpu_pass, matmul_rate; "
            f"print(json.dumps({call}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_transform_bench(rows: int = 1_000_000, dim: int = 128, inners=(2048,),
                        batch_rows: int = 65536, seed: int = 0,
                        workdir: str | None = None) -> dict:  # fmt: skip
    from distcl.bench.evalcost import write_store

    out: dict = {"rows": rows, "dim": dim, "batch_rows": batch_rows,
                 "blas_threads": os.environ.get("OMP_NUM_THREADS", "default"),
                 "cpus": os.cpu_count(), "inner": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        store = Path(tmp) / "gallery"
        t0 = time.perf_counter()
        write_store(store, 1, rows, 0, dim, seed)
        out["write_s"] = time.perf_counter() - t0
        out["read"] = _sub(f"read_pass({str(store)!r}, None, {batch_rows})")
        for inner in inners:
            arrays, params = _h_arrays(dim, inner, seed)
            path = Path(tmp) / f"h{inner}.npz"
            np.savez(path, **arrays)
            r = _sub(f"read_pass({str(store)!r}, {str(path)!r}, {batch_rows})")
            r["params"] = params
            r["mflop_per_row"] = flops_per_row(arrays) / 1e6  # as applied (zeros included)
            r["gflops"] = r["mflop_per_row"] * rows / 1e3 / r["seconds"]
            r["matmul_gflops"] = _sub(f"matmul_rate({inner})")
            r["ratio_over_read"] = r["seconds"] / out["read"]["seconds"]
            r["gpu"] = _sub(f"gpu_pass({str(store)!r}, {str(path)!r}, {batch_rows})")
            if r["gpu"]:
                r["gpu"]["ratio_over_read"] = r["gpu"]["seconds"] / out["read"]["seconds"]
            out["inner"][inner] = r
    return out


def format_transform_bench(r: dict) -> str:
    lines = [
        f"distcl bench transform: {r['rows']} rows, d={r['dim']}, batches of {r['batch_rows']} "
        f"({r['cpus']} CPUs, BLAS threads: {r['blas_threads']})",
        f"  write Parquet: {r['write_s']:.1f} s",
        f"  read pass (baseline): {r['read']['seconds']:.2f} s "
        f"({r['rows'] / r['read']['seconds']:,.0f} rows/s)",
    ]  # fmt: skip
    for inner, x in r["inner"].items():
        lines.append(
            f"  h, inner {inner} ({x['params'] / 1e6:.2f}M params, {x['mflop_per_row']:.2f} "
            f"MFLOP/row): {x['seconds']:.2f} s ({r['rows'] / x['seconds']:,.0f} rows/s), "
            f"{x['ratio_over_read']:.2f}x the read pass (goal <= 1.5); {x['gflops']:.0f} GFLOP/s "
            f"of a {x['matmul_gflops']:.0f} GFLOP/s matmul rate here"
        )  # fmt: skip
        if x["gpu"]:
            lines.append(f"    on {x['gpu']['device']}: {x['gpu']['seconds']:.2f} s, "
                         f"{x['gpu']['ratio_over_read']:.2f}x the read pass")  # fmt: skip
        else:
            lines.append("    GPU: none here (torch sees no CUDA device)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="distcl bench transform", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--inner", type=int, action="append", help="h's inner width (repeatable; "
                   "default 2048, FCT's)")  # fmt: skip
    p.add_argument("--batch-rows", type=int, default=65536)
    p.add_argument("--workdir", default=None, help="where the Parquet store is written")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run_transform_bench(a.rows, a.dim, tuple(a.inner or [2048]), a.batch_rows,
                            workdir=a.workdir)  # fmt: skip
    print(json.dumps(r, indent=1) if a.json else format_transform_bench(r))
