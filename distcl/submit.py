"""Submit jobs to a Ray cluster through the Ray Jobs API, and manage them.

    distcl submit jobs/templates/imagenet100.yaml --address http://HEAD:8265 --wait
    distcl submit JOB --address http://127.0.0.1:8265 --smoke --set output.root=/tmp/runs
    distcl jobs list --address http://HEAD:8265
    distcl jobs logs distcl-imagenet100-20260101-120000-ab12 --address http://HEAD:8265
    distcl jobs stop ID --address http://HEAD:8265

How a job travels (no copy of the project is made):
  1. the job file is validated here, with ``--set`` and ``--smoke`` applied, so a bad file
     fails before the cluster is contacted (exit 2, the message names the field);
  2. the dashboard is probed with a short timeout, so a wrong address or token fails within
     seconds (exit 3) instead of hanging on the OS connect timeout;
  3. ``runtime_env.working_dir`` ships the project folder (Ray honours ``.gitignore`` and
     ``.rayignore``, skips ``.git``/``.venv``; we exclude ``runs/`` and caches too), so
     the driver and every Train worker import the shipped ``distcl``; pip dependencies are
     expected on the cluster image (see ``cluster/README.md``);
  4. the resolved job travels as YAML text in ``runtime_env.env_vars[DISTCL_JOB_YAML]``;
     the entrypoint ``python -m distcl.submit run --job-name NAME`` (this module's
     :func:`main`, run on the head) writes it to a private temp file and calls
     ``distcl run FILE --no-progress`` (or ``distcl tune FILE``). The driver connects to
     the cluster through the ``RAY_ADDRESS`` that Ray Jobs sets.

Paths in the job are paths *on the cluster*: ``output.root`` (and ``data.shards_dir`` if
set) must be absolute paths on storage that every node mounts (NFS, EFS, Filestore, a
PersistentVolume). A relative path would land in the job's temporary working-dir copy on
the head and be lost; an object-store URI (``s3://...``) is refused because the driver
writes with local file APIs (mount the bucket instead). Both are rejected here, with a hint.

Token authentication (Ray's ``RAY_AUTH_MODE=token``): the token comes from ``--token``,
else ``$RAY_JOB_TOKEN``, else ``$RAY_AUTH_TOKEN``, and is sent as ``Authorization: Bearer``
on every request (submit, logs, the log websocket). Without one, Ray's own client adds the
token it finds when ``RAY_AUTH_MODE=token`` is set locally.

Exit codes: 0 submitted (or SUCCEEDED with ``--wait``), 1 the job FAILED or was STOPPED,
2 bad job file or arguments, 3 the cluster cannot be reached or refused the request,
130 interrupted while following (the job keeps running).

Tested by ``tests/test_submit.py`` (unit tests, and an end-to-end test against a real Ray
head under the ``ray``/``slow`` markers).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import secrets
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

import yaml

from distcl.config import ConfigError, JobConfig, dump_job, load_job, parse_job

#: The runtime-env variable that carries the resolved job YAML to the cluster.
ENV_JOB = "DISTCL_JOB_YAML"
#: Environment variables read for the auth token, in order (after ``--token``).
TOKEN_ENV = ("RAY_JOB_TOKEN", "RAY_AUTH_TOKEN")
EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_CLUSTER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: Added to Ray's own excludes (.git, .venv, venv, __pycache__) and the ignore files:
#: run outputs and caches never belong in the shipped project.
WORKING_DIR_EXCLUDES = [
    "runs/", "data_cache/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/", "build/",
    "dist/", "*.pyc",
]  # fmt: skip
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: Seconds to wait for the dashboard to accept a connection / to answer.
CONNECT_TIMEOUT_S = 5.0


class ClusterError(RuntimeError):
    """The cluster cannot be reached, or it refused the request or the token."""


# ------------------------------------------------------------------------ addresses, auth
def normalize_address(address: str) -> str:
    """``HOST:8265`` -> ``http://HOST:8265``; reject what is not a dashboard URL."""
    address = (address or "").strip().rstrip("/")
    if not address:
        raise ValueError("--address: empty; expected the dashboard URL, http://HOST:8265")
    if address.startswith("ray://"):
        raise ValueError(
            f"--address: {address} is a Ray Client address; jobs are submitted to the "
            "dashboard's HTTP port instead, e.g. http://HOST:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"--address: {address!r} is not an http(s)://HOST:PORT URL")
    return address


def resolve_token(token: str | None = None) -> str | None:
    """The auth token: ``token``, else ``$RAY_JOB_TOKEN``, else ``$RAY_AUTH_TOKEN``."""
    if token:
        return token.strip()
    for name in TOKEN_ENV:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers that carry ``token`` (empty without one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_dashboard(
    address: str, token: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S
) -> str:
    """Probe ``address``/api/version quickly; return the cluster's Ray version.

    Raises :class:`ClusterError` with a message naming the address for an unreachable
    host, a missing or rejected token, or a server that is not a Ray dashboard.
    """
    import requests

    url = f"{address}/api/version"
    try:
        r = requests.get(url, headers=auth_headers(token), timeout=(timeout_s, 2 * timeout_s))
    except requests.exceptions.RequestException as e:
        if isinstance(e, requests.exceptions.Timeout):
            reason = f"no answer within {timeout_s:g}s"
        else:  # "[Errno 111] Connection refused", "[Errno -2] Name or service not known"
            found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(e))
            reason = found.group(1).strip() if found else type(e).__name__
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address} ({reason}). Is the head running, "
            "and is this its dashboard port (8265 by default; not the GCS port 6379)? For "
            "a remote cluster forward the port first: `ray dashboard cluster/ray-cluster."
            "yaml` or `kubectl port-forward svc/distcl-head-svc 8265:8265`"
        ) from None
    if r.status_code == 401:
        raise ClusterError(
            f"the cluster at {address} requires a token: pass --token or set RAY_JOB_TOKEN "
            "(on the head, `ray get-auth-token` prints it)"
        )
    if r.status_code == 403:
        raise ClusterError(
            f"the cluster at {address} rejected the token "
            "(from --token, $RAY_JOB_TOKEN or $RAY_AUTH_TOKEN)"
        )
    try:
        r.raise_for_status()
        return str(r.json()["ray_version"])
    except (ValueError, KeyError, requests.exceptions.HTTPError):
        raise ClusterError(
            f"{url} answered HTTP {r.status_code} without a Ray version: "
            "not a Ray dashboard (is the port right?)"
        ) from None


def connect(address: str, token: str | None = None, log: TextIO = sys.stderr):
    """A ``JobSubmissionClient`` for ``address``, after a fast reachability probe."""
    import ray
    from ray.job_submission import JobSubmissionClient

    address = normalize_address(address)
    token = resolve_token(token)
    cluster_version = check_dashboard(address, token)
    if cluster_version.split(".")[:2] != ray.__version__.split(".")[:2]:
        print(
            f"distcl: note: the cluster runs Ray {cluster_version}, this client "
            f"Ray {ray.__version__}",
            file=log,
        )
    try:
        return JobSubmissionClient(address, headers=auth_headers(token) or None)
    except Exception as e:  # auth/version errors raised by Ray's own checks
        raise ClusterError(f"{address}: {e}") from None


# ------------------------------------------------------------------------ what is shipped
def check_cluster_paths(job: JobConfig) -> None:
    """Raise :class:`ConfigError` for job paths that cannot work on a cluster."""
    paths = {"output.root": job.output.root}
    if job.data.shards_dir:
        paths["data.shards_dir"] = job.data.shards_dir
    for name, value in paths.items():
        if "://" in value:
            raise ConfigError(
                f"{name}: {value!r} is an object-store URI; the driver writes runs with "
                "local file APIs, so mount the bucket (s3fs, gcsfuse, a CSI driver) on "
                "every node and give its path, e.g. /mnt/shared/distcl-runs"
            )
        if not Path(value).is_absolute():
            raise ConfigError(
                f"{name}: {value!r} is relative; on the cluster it would resolve inside "
                "the job's temporary copy of the working dir and be lost. Use a path on "
                f"storage every node mounts, e.g. --set {name}=/mnt/shared/distcl-runs"
            )


def build_entrypoint(job: JobConfig, command: str = "run") -> str:
    """The shell command Ray Jobs runs on the head (see :func:`main`)."""
    if command not in ("run", "tune"):
        raise ValueError(f"command: must be 'run' or 'tune', got {command!r}")
    return f"python -m distcl.submit {command} --job-name {shlex.quote(job.name)}"


def build_runtime_env(job: JobConfig, working_dir: str | Path) -> dict[str, Any]:
    """``working_dir`` (the project, ignore files honoured) + the job YAML as an env var."""
    folder = Path(working_dir).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"--working-dir: {folder} is not a folder")
    return {
        "working_dir": str(folder),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": {ENV_JOB: dump_job(job)},
    }


def submission_id_for(job: JobConfig) -> str:
    """A readable, unique id: ``distcl-<name>-<YYYYmmdd-HHMMSS>-<4 hex>``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", job.name).strip("-") or "job"
    return f"distcl-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(
    job: JobConfig,
    address: str,
    *,
    command: str = "run",
    working_dir: str | Path = ".",
    token: str | None = None,
    log: TextIO = sys.stderr,
) -> tuple[Any, str]:
    """Submit a validated ``job``; return ``(client, submission_id)``."""
    check_cluster_paths(job)
    if command == "tune" and job.tune is None:
        raise ConfigError(f"{job.name}: --tune needs a tune: section in the job")
    runtime_env = build_runtime_env(job, working_dir)
    if not (Path(runtime_env["working_dir"]) / "distcl" / "__init__.py").is_file():
        print(
            f"distcl: note: {runtime_env['working_dir']} has no distcl/ package; the "
            "cluster's Python must have distcl installed",
            file=log,
        )
    client = connect(address, token, log=log)
    # Ray logs every ignore file it honours at INFO; keep its "Uploading package" line only.
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    metadata = {
        "distcl_job": job.name,
        "distcl_command": command,
        "distcl_smoke": str(job.smoke).lower(),
        "distcl_run_dir": str(job.run_dir),
    }
    try:
        sid = client.submit_job(
            entrypoint=build_entrypoint(job, command),
            runtime_env=runtime_env,
            metadata=metadata,
            submission_id=submission_id_for(job),
        )
    except Exception as e:  # HTTP errors, an oversized package, a refused runtime env
        raise ClusterError(
            f"the cluster at {normalize_address(address)} refused the job: {e}"
        ) from None
    return client, sid


# ------------------------------------------------------------------------ following
def _tail(client: Any, sid: str, out: TextIO) -> None:
    async def follow() -> None:
        async for chunk in client.tail_job_logs(sid):
            out.write(chunk)
            out.flush()

    asyncio.run(follow())


def wait_for_job(
    client: Any,
    sid: str,
    *,
    follow: bool = True,
    out: TextIO = sys.stdout,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> str:
    """Stream the job's logs (``follow``) until it ends; return its final status name."""
    if follow:
        try:
            _tail(client, sid, out)
        except Exception as e:  # websocket dropped: keep polling the status instead
            print(f"distcl: log stream ended early ({e}); polling the status", file=sys.stderr)
    start = time.monotonic()
    while True:
        status = _status_name(client.get_job_status(sid))
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"job {sid} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


# ------------------------------------------------------------------------ CLI: submit, jobs
def submit_job(args: argparse.Namespace) -> int:
    """``distcl submit``: validate, submit, and with ``--wait`` follow to the end."""
    t0 = time.perf_counter()
    try:
        job = load_job(args.job, overrides=args.set or (), smoke=True if args.smoke else None)
        command = "tune" if args.tune else "run"
        client, sid = submit(
            job, args.address, command=command, working_dir=args.working_dir, token=args.token
        )
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"distcl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ClusterError as e:
        print(f"distcl: error: {e}", file=sys.stderr)
        return EXIT_CLUSTER
    address = normalize_address(args.address)
    print(
        f"submitted {sid} ({command} {job.name}) -> {address}; run dir on the cluster: "
        f"{job.run_dir}",
        file=sys.stderr,
    )
    if not args.wait:
        print(f"follow it: distcl jobs logs {sid} --address {address}", file=sys.stderr)
        print(sid)
        return EXIT_OK
    try:
        status = wait_for_job(client, sid)
    except KeyboardInterrupt:
        print(
            f"\ndistcl: stopped following {sid}; it keeps running "
            f"(distcl jobs stop {sid} --address {address})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    info = client.get_job_info(sid)
    tail = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
    print(f"job {sid} {status} after {time.perf_counter() - t0:.0f}s{tail}", file=sys.stderr)
    return EXIT_OK if status == "SUCCEEDED" else EXIT_JOB_FAILED


def jobs_command(args: argparse.Namespace) -> int:
    """``distcl jobs {list,status,logs,stop}``."""
    if args.action != "list" and not args.job_id:
        print(
            f"distcl: error: jobs {args.action}: a submission id is required "
            "(see `distcl jobs list`)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        client = connect(args.address, args.token)
        if args.action == "list":
            print(format_job_table(client.list_jobs()))
        elif args.action == "status":
            info = client.get_job_info(args.job_id)
            print(
                f"{args.job_id}: {_status(info)}" + (f" ({info.message})" if info.message else "")
            )
        elif args.action == "logs":
            sys.stdout.write(client.get_job_logs(args.job_id))
        else:
            stopped = client.stop_job(args.job_id)
            print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    except ValueError as e:
        print(f"distcl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ClusterError, RuntimeError) as e:  # Ray raises RuntimeError for unknown ids
        what = f"jobs {args.action}" + (f" {args.job_id}" if args.job_id else "")
        print(f"distcl: error: {what}: {e}", file=sys.stderr)
        return EXIT_CLUSTER
    return EXIT_OK


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))  # JobStatus is a str Enum


def _status(info: Any) -> str:
    return _status_name(info.status)


def format_job_table(jobs: list[Any]) -> str:
    """One line per job, oldest first: id, status, distcl job, start time, entrypoint."""
    rows = [("SUBMISSION ID", "STATUS", "JOB", "STARTED", "ENTRYPOINT")]
    for info in sorted(jobs, key=lambda j: j.start_time or 0):
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000))
            if info.start_time
            else "-"
        )
        name = (info.metadata or {}).get("distcl_job", "-")
        rows.append(
            (
                info.submission_id or info.job_id or "-",
                _status(info),
                name,
                started,
                (info.entrypoint or "")[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        for r in rows
    )


# ------------------------------------------------------------------------ cluster side
def main(argv: list[str] | None = None) -> int:
    """The entrypoint on the cluster: ``python -m distcl.submit {run,tune} --job-name N``.

    Reads the job from ``$DISTCL_JOB_YAML``, writes it to a private temp file and hands it
    to ``distcl run`` (no live progress bar: logs are not a terminal) or ``distcl tune``.
    """
    from distcl import cli

    parser = argparse.ArgumentParser(prog="python -m distcl.submit", description=main.__doc__)
    parser.add_argument("command", choices=["run", "tune"])
    parser.add_argument("--job-name", required=True, help="must match the shipped job")
    args = parser.parse_args(argv)
    text = os.environ.get(ENV_JOB, "")
    if not text.strip():
        print(
            f"distcl: error: ${ENV_JOB} is empty; submit jobs with `distcl submit`", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        job = parse_job(yaml.safe_load(text), source=f"${ENV_JOB}")
        if job.name != args.job_name:
            raise ConfigError(f"${ENV_JOB} holds job {job.name!r}, not {args.job_name!r}")
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    except (ConfigError, ValueError) as e:
        print(f"distcl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(
            f"distcl: error: output.root {job.output.root} is not writable on this node "
            f"({e}); mount shared storage there on every node",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(
        f"distcl {args.command} {job.name}: cwd {os.getcwd()}, run dir {job.run_dir}, "
        f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '-')}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="distcl-job-") as d:
        path = Path(d) / f"{job.name}.yaml"
        path.write_text(text)
        extra = ["--no-progress"] if args.command == "run" else []
        return cli.main([args.command, str(path), *extra])


if __name__ == "__main__":
    sys.exit(main())
