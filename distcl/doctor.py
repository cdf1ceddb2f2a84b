"""``distcl doctor``: will a job run here, before it runs for hours? One line per check.

    distcl doctor                          # this machine, the default job's settings
    distcl doctor JOB [--set KEY=VALUE]    # the job's data root, output root and precision
    distcl doctor JOB --address ADDR       # every node of a Ray cluster (a Ray task each)

Checks (each fails with what to do):
- ``versions``: Ray, torch, torchvision, faiss, pyarrow, webdataset against the ranges distcl
  declares (pyproject.toml), and, where a GPU is, CUDA and nccl as torch sees them;
- ``process group``: two processes join a torch process group over 127.0.0.1 and all-reduce
  (gloo; nccl too where there are GPUs, one rank per GPU);
- ``ddp step``: one DistributedDataParallel step of the job's model in the job's precision
  (``train.precision``) on those ranks: finite loss, parameters equal on every rank after;
- ``faiss gpu``: faiss-gpu search equal to faiss-cpu search on the same rows (where faiss
  sees a GPU);
- ``data root`` / ``output root``: the job's data readable, its output root writable (a file
  written, renamed and removed; object stores too);
- ``ray loopback`` (embedded Ray only): every socket of a fresh embedded Ray on loopback.

Exit status: 0 when nothing failed, 1 otherwise (2: a bad job file, as every command).
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from distcl.config import JobConfig


@dataclass(frozen=True)
class Check:
    """One line of the table: ``ok`` True (passed), False (failed) or None (not applicable)."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""

    @property
    def status(self) -> str:
        return {True: "ok", False: "FAIL", None: "skip"}[self.ok]


# ------------------------------------------------------------------ versions
_PACKAGES = {  # distribution -> how it is imported (None: not a module name of its own)
    "ray": "ray", "torch": "torch", "torchvision": "torchvision", "pyarrow": "pyarrow",
    "webdataset": "webdataset", "numpy": "numpy",
}  # fmt: skip


def declared_requirements() -> dict[str, str]:
    """distcl's requirement specifiers by distribution name (installed metadata, else the
    pyproject.toml beside the package), extras' faiss included."""
    from packaging.requirements import Requirement

    try:
        reqs = metadata.requires("distcl") or []
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        reqs = re.findall(r'^\s*"([A-Za-z0-9_.\-\[\],]+[<>=!~][^"]*)"', text, re.M)
    out: dict[str, str] = {}
    for line in reqs:
        req = Requirement(line)
        out.setdefault(req.name, str(req.specifier))
    return out


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_versions(ray_version: str | None = None) -> list[Check]:
    """Installed releases against the declared ranges (``ray_version``: test override)."""
    from packaging.specifiers import SpecifierSet

    from distcl.raycompat import SUPPORTED_RAY

    declared = declared_requirements()
    out = []
    for dist in _PACKAGES:
        have = ray_version if dist == "ray" and ray_version else _installed(dist)
        spec = SUPPORTED_RAY if dist == "ray" else declared.get(dist, "")  # as declared
        name = f"version {dist}"
        if have is None:
            out.append(Check(name, False, "not installed", f"pip install '{dist}{spec}'"))
        elif spec and not SpecifierSet(spec).contains(have, prereleases=True):
            out.append(
                Check(
                    name,
                    False,
                    f"{have}, distcl needs {spec}",
                    f"pip install '{dist}{spec}' (the releases the suite passed on)",
                )
            )
        else:
            out.append(Check(name, True, f"{have} ({spec or 'any'})"))
    faiss = {d: _installed(d) for d in ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12")}
    found = {d: v for d, v in faiss.items() if v}
    if not found:
        out.append(
            Check(
                "version faiss",
                False,
                "no faiss distribution installed",
                "pip install 'distcl[cpu]' (faiss-cpu) or 'distcl[gpu]' (faiss-gpu)",
            )
        )
    elif len(found) > 1:
        out.append(
            Check(
                "version faiss",
                False,
                f"several installed: {found}",
                "keep one: faiss-cpu and faiss-gpu install the same module",
            )
        )
    else:
        (dist, v), = found.items()  # fmt: skip
        out.append(Check("version faiss", True, f"{dist} {v}"))
    out.append(_check_cuda())
    return out


def _check_cuda() -> Check:
    import torch

    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        return Check("cuda / nccl", None, f"no GPU visible (torch {torch.__version__}, {build})")
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # a build without nccl
        return Check(
            "cuda / nccl",
            False,
            f"CUDA {torch.version.cuda}, nccl: {e}",
            "install a torch build with nccl (the CUDA wheels from pytorch.org)",
        )
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    return Check(
        "cuda / nccl",
        True,
        f"CUDA {torch.version.cuda}, nccl {nccl}, "
        f"{torch.cuda.device_count()} GPU(s): {', '.join(sorted(names))}",
    )


# ------------------------------------------------------------------ process group and DDP
def _image_shape(job: JobConfig) -> tuple[int, int, int]:
    d = job.data
    if d.source == "fashion-mnist":
        return 1, 28, 28
    if d.source == "synthetic":
        return 1, d.synthetic_size, d.synthetic_size
    return 3, d.image_size, d.image_size


def _num_classes(job: JobConfig) -> int:
    return {"fashion-mnist": 10, "synthetic": job.data.synthetic_classes}.get(
        job.data.source, 10)  # fmt: skip


def _rank(rank: int, world: int, port: int, backend: str, job: JobConfig, out: str) -> None:
    """A spawned rank: join the group, all-reduce, one DDP step; writes its result to out."""
    import json

    import torch
    import torch.distributed as dist

    result: dict = {}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, rank=rank, world_size=world)
        x = torch.tensor([float(rank + 1)], device=dev)
        dist.all_reduce(x)
        result["sum"] = float(x)
        from distcl.train.modeling import build_model
        from distcl.train.precision import resolve_precision

        c, h, w = _image_shape(job)
        precision = resolve_precision(job.train.precision, dev)
        torch.manual_seed(job.seed)
        model = precision.model(build_model(job, _num_classes(job), c).to(dev))
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)  # fmt: skip
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(rank)
        images = precision.images(torch.rand(4, c, h, w, generator=gen).to(dev))
        labels = torch.randint(0, _num_classes(job), (4,), generator=gen).to(dev)
        scaler = precision.scaler()
        with precision.autocast():
            loss = torch.nn.functional.cross_entropy(ddp(images)["logits"].float(), labels)
        (scaler.scale(loss) if scaler else loss).backward()
        scaler.step(opt) if scaler else opt.step()
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        result.update(loss=float(loss.detach()), same=bool(torch.equal(flat, ref)),
                      precision=precision.name)  # fmt: skip
        dist.destroy_process_group()
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["trace"] = traceback.format_exc(limit=3)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_process_group(job: JobConfig, backend: str, world: int, timeout_s: float = 120.0):
    """The process-group and DDP-step checks on ``world`` spawned ranks of ``backend``."""
    import json
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="distcl-doctor-") as tmp:
        out = os.path.join(tmp, "rank")
        t0 = time.perf_counter()
        ctx = mp.start_processes(_rank, args=(world, _free_port(), backend, job, out),
                                 nprocs=world, join=False, start_method="spawn")  # fmt: skip
        while not ctx.join(timeout=1.0):
            if time.perf_counter() - t0 > timeout_s:
                for p in ctx.processes:
                    p.kill()
                fix = "a rank hung: check that 127.0.0.1 is reachable and no firewall blocks it"
                return [Check(f"process group {backend}", False, f"timed out ({timeout_s:.0f} s)",
                              fix)]  # fmt: skip
        results = [json.loads(open(f"{out}.{r}").read()) for r in range(world)]
    seconds = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        fix = (
            "nccl: check CUDA_VISIBLE_DEVICES and the NCCL_* settings of the nodes"
            if backend == "nccl"
            else "gloo: check that 127.0.0.1 is reachable"
        )
        return [Check(f"process group {backend}", False, errors[0], fix)]
    want = world * (world + 1) / 2
    sums = {r["sum"] for r in results}
    out_checks = [
        Check(
            f"process group {backend}",
            sums == {want},
            f"{world} ranks, all-reduce {sorted(sums)} (expected {want:g}), {seconds:.1f} s",
            "" if sums == {want} else "collectives are broken",
        )
    ]
    finite = all(abs(r["loss"]) < float("inf") for r in results)
    same = all(r["same"] for r in results)
    prec = results[0]["precision"]
    out_checks.append(Check(
        f"ddp step {backend}", finite and same,
        f"{job.model.backbone}, {prec}: loss {results[0]['loss']:.3f}, parameters "
        f"{'equal' if same else 'DIFFER'} on every rank",
        "" if finite and same else f"train.precision: {prec} misbehaves here; try fp32",
    ))  # fmt: skip
    return out_checks


def check_training(job: JobConfig) -> list[Check]:
    """gloo on 2 CPU ranks; nccl on the GPUs (one rank each, at most 2) where there are."""
    import torch

    checks = check_process_group(job, "gloo", 2)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        checks += check_process_group(job, "nccl", min(gpus, 2))
    else:
        checks.append(Check("process group nccl", None, "no GPU visible"))
    return checks


# ------------------------------------------------------------------ faiss, data, output
def check_faiss_gpu() -> Check:
    import numpy as np

    from distcl.gallery.index import build_index, gpu_available

    if not gpu_available():
        return Check("faiss gpu", None, "faiss sees no GPU (faiss-cpu, or no GPU here)")
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((20_000, 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    queries = rows[:500]
    s_cpu, i_cpu = build_index(rows, "flat", use_gpu=False).search(queries, 10)
    s_gpu, i_gpu = build_index(rows, "flat", use_gpu=True).search(queries, 10)
    same = float((i_cpu == i_gpu).mean())
    close = bool(np.allclose(s_cpu, s_gpu, atol=1e-4))
    ok = same >= 0.999 and close
    return Check(
        "faiss gpu",
        ok,
        f"top-10 ids equal to faiss-cpu's: {same:.2%}, scores "
        f"{'within 1e-4' if close else 'DIFFER'}",
        "" if ok else "reinstall faiss-gpu for this CUDA (pip install 'distcl[gpu]')",
    )


def check_data_root(job: JobConfig) -> Check:
    from distcl.data.sources import DataError, fashion_mnist_root

    d = job.data
    if d.source == "synthetic":
        return Check("data root", None, "synthetic data (generated, nothing to read)")
    if d.source == "fashion-mnist":
        try:
            root = fashion_mnist_root(d.root)
        except DataError as e:
            return Check("data root", False, str(e).split(". ")[0],
                         "set data.root to a folder with the four Fashion-MNIST IDX files, or "
                         "apt-get install dataset-fashion-mnist")  # fmt: skip
        unreadable = [p.name for p in root.iterdir() if p.is_file() and not os.access(p, os.R_OK)]
        if unreadable:
            return Check(
                "data root",
                False,
                f"{root}: cannot read {unreadable}",
                "fix the files' permissions",
            )
        return Check("data root", True, f"fashion-mnist in {root}")
    root = Path(d.root or "")
    if not d.root or not root.is_dir():
        return Check(
            "data root",
            False,
            f"data.root {d.root!r} is not a folder",
            "set data.root to an ImageFolder tree (one folder per class)",
        )
    classes = [p for p in (root / "train" if (root / "train").is_dir() else root).iterdir()
               if p.is_dir()]  # fmt: skip
    ok = len(classes) >= 2
    return Check(
        "data root",
        ok,
        f"{root}: {len(classes)} class folders",
        "" if ok else "an ImageFolder tree needs one folder per class (at least 2)",
    )


def check_output_root(job: JobConfig) -> Check:
    from distcl import storage

    root = job.output.root
    probe = storage.join(root, f".doctor-{uuid.uuid4().hex[:8]}")
    try:
        storage.makedirs(storage.location(root))
        storage.write_text(probe, "distcl doctor")  # temp name, then rename (or one put)
        back = storage.read_text(probe)
        storage.delete(probe)
    except Exception as e:
        return Check(
            "output root",
            False,
            f"{root}: {type(e).__name__}: {e}",
            "set output.root to a writable folder, shared file system or bucket "
            "(object stores: the AWS_* / GOOGLE_* credentials in every process)",
        )
    ok = back == "distcl doctor"
    return Check(
        "output root",
        ok,
        f"{root}: written, read back, removed",
        "" if ok else "the storage returned other bytes than written",
    )


def check_loopback() -> Check:
    """A fresh embedded Ray in a child process (this one may hold another Ray)."""
    import subprocess

    code = ("from distcl.localray import init_ray, check_loopback, current_session\n"
            "init_ray(num_cpus=1)\nimport ray, time\nray.get(ray.remote(lambda: 0).remote())\n"
            "time.sleep(2)\nprint(len(check_loopback(current_session())))\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=180, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Check(
            "ray loopback",
            False,
            "an embedded Ray did not start in 180 s",
            "run `python -m distcl.localray sockets` to see where it stops",
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return Check(
            "ray loopback",
            False,
            last,
            "start a Ray head yourself (`ray start --head`, firewalled) and pass "
            "its address (--address / $RAY_ADDRESS)",
        )
    n = proc.stdout.strip().splitlines()[-1]
    return Check("ray loopback", True, f"embedded Ray: {n} listening sockets, all on loopback")


# ------------------------------------------------------------------ running them
def node_checks(job: JobConfig) -> list[Check]:
    """Every check that runs on one node (all but the embedded Ray's loopback)."""
    checks = check_versions()
    checks += check_training(job)
    checks += [check_faiss_gpu(), check_data_root(job), check_output_root(job)]
    return checks


def run_on_cluster(job: JobConfig) -> dict[str, list[Check]]:
    """:func:`node_checks` as one Ray task on each alive node of the connected cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0)(node_checks)
    refs = {
        f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(job)
        for n in nodes
    }
    return {name: ray.get(ref) for name, ref in refs.items()}


def format_table(checks: list[Check]) -> str:
    w = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.name:<{w}}  {c.status:<4}  {c.detail}")
        if c.ok is False and c.fix:
            lines.append(f"{'':<{w}}        fix: {c.fix}")
    return "\n".join(lines)


def doctor(job: JobConfig, address: str | None = None, log=print) -> int:
    """Run the checks here (and the embedded Ray's loopback check) or on every node of the
    cluster at ``address``; print the table(s); 0 when nothing failed, else 1."""
    if address:
        from distcl.localray import init_ray

        init_ray(address)
        tables = run_on_cluster(job)
    else:
        tables = {"this machine": [*node_checks(job), check_loopback()]}
    failed = 0
    for where, checks in tables.items():
        log(f"== {where}")
        log(format_table(checks))
        failed += sum(c.ok is False for c in checks)
    log(f"{failed} check(s) failed" if failed else "all checks passed")
    return 1 if failed else 0
