"""Submit jobs to a Ray cluster through the Ray Jobs API (``distcl jobs``: distcl.jobctl).

    distcl submit jobs/templates/imagenet100.yaml --address https://HEAD:8265 --wait
    distcl submit JOB --address http://127.0.0.1:8265 --smoke --set output.root=/tmp/runs
    RAY_JOB_TOKEN=... distcl submit JOB --address ...      # or --token-file ~/.ray/job-token

How a job travels (no copy of the project is made):
  1. the job file is validated here (``--set``, ``--smoke`` applied): a bad file fails
     before the cluster is contacted (exit 2, the message names the field);
  2. the dashboard is probed with a short timeout: a wrong address or token fails within
     seconds (exit 3);
  3. ``runtime_env.working_dir`` ships the project folder (Ray honours ``.gitignore`` and
     ``.rayignore``); :data:`WORKING_DIR_EXCLUDES` also keeps run outputs, caches, ``.env``
     files and credential files (keys, tokens, cloud configs) off the cluster;
  4. the resolved job travels as YAML in ``runtime_env.env_vars[DISTCL_JOB_YAML]``; the
     entrypoint ``python -m distcl.submit run --job-name NAME`` (:func:`main`, on the head)
     hands it to ``distcl run FILE --no-progress`` (or ``distcl tune FILE``).

Paths in the job are paths *on the cluster*: ``output.root`` (and ``data.shards_dir``) must
be absolute paths on storage every node mounts (NFS, a RWX volume; cluster/README.md).

Token (Ray's ``RAY_AUTH_MODE=token``): ``--token``, else ``--token-file``, else
``$RAY_JOB_TOKEN``, else ``$RAY_AUTH_TOKEN``; sent as ``Authorization: Bearer``. A token on
the command line is visible to other users (``ps``, shell history): prefer the file or the
environment. A token sent over plain ``http://`` to a host that is not loopback gets a
warning: use ``https://`` or a tunnel (``ray dashboard``, ``kubectl port-forward``).

Exit codes: 0 submitted (or SUCCEEDED with ``--wait``), 1 the job FAILED or was STOPPED,
2 bad job file or arguments, 3 the cluster cannot be reached or refused the request,
130 interrupted while following (the job keeps running). Tests: ``tests/test_submit.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

from distcl import storage
from distcl.config import ConfigError, JobConfig, dump_job, load_job, parse_job
from distcl.jobctl import (  # noqa: F401  (re-exported: the CLI and tests use them here)
    CONNECT_TIMEOUT_S,
    EXIT_CLUSTER,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    TOKEN_ENV,
    ClusterError,
    auth_headers,
    check_dashboard,
    connect,
    format_job_table,
    is_loopback_host,
    jobs_command,
    normalize_address,
    resolve_token,
    token_transport_warning,
    wait_for_job,
)

#: The runtime-env variable that carries the resolved job YAML to the cluster.
ENV_JOB = "DISTCL_JOB_YAML"
#: Added to Ray's own excludes (.git, .venv, __pycache__) and the ignore files: run
#: outputs and caches, and secrets that must never be uploaded to a cluster.
WORKING_DIR_EXCLUDES = [
    "runs/", "data_cache/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/", "build/",
    "dist/", "*.pyc",
    ".env", ".env.*", "*.env", ".envrc", ".netrc", ".git-credentials", ".pypirc",
    "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ecdsa*", "id_ed25519*",
    "credentials", "credentials.*", "*credentials*.json", "*.token", "auth_token",
    "token", ".aws/", ".ssh/", ".docker/", ".kube/", ".gnupg/", ".ray/", "gcloud/",
]  # fmt: skip


# ------------------------------------------------------------------------ what is shipped
def check_cluster_paths(job: JobConfig) -> None:
    """Raise :class:`ConfigError` for job paths that cannot work on a cluster: a relative
    path. Absolute paths (storage every node mounts) and object-store URIs pass; a URI needs
    the bucket's credentials on every node (an instance role, or the AWS variables set where
    the nodes' ``ray start`` runs): they are not shipped with the job."""
    paths = {"output.root": job.output.root}
    if job.data.shards_dir:
        paths["data.shards_dir"] = job.data.shards_dir
    for name, value in paths.items():
        if "://" in value and not value.startswith("file://"):
            continue  # an object-store URI: every node reaches it (distcl.storage)
        if not Path(storage.location(value)).is_absolute():
            raise ConfigError(
                f"{name}: {value!r} is relative; on the cluster it would resolve inside "
                "the job's temporary copy of the working dir and be lost. Use a path on "
                f"storage every node mounts, e.g. --set {name}=/mnt/shared/distcl-runs"
            )


def check_job_name(name: str) -> None:
    """Refuse a job name that could escape a folder or read as an option (ConfigError)."""
    if (
        not name
        or name in (".", "..")
        or any(c in name for c in "/\\\0")
        or name.startswith(("-", "."))
    ):
        raise ConfigError(
            f"name: {name!r} is not a plain name (no '/', '\\', '..', leading '.' or '-'): "
            "it names the run folder"
        )


def build_entrypoint(job: JobConfig, command: str = "run") -> str:
    """The shell command Ray Jobs runs on the head (see :func:`main`)."""
    if command not in ("run", "tune"):
        raise ValueError(f"command: must be 'run' or 'tune', got {command!r}")
    check_job_name(job.name)
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
    token_file: str | None = None,
) -> tuple[Any, str]:
    """Submit a validated ``job``; return ``(client, submission_id)``."""
    check_job_name(job.name)
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
    client = connect(address, token, log=log, token_file=token_file)
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


# ------------------------------------------------------------------------ CLI: submit
def submit_job(args: argparse.Namespace) -> int:
    """``distcl submit``: validate, submit, and with ``--wait`` follow to the end."""
    t0 = time.perf_counter()
    if args.token:
        print(
            "distcl: note: a token on the command line is visible to other users (ps, shell "
            "history); prefer --token-file FILE or $RAY_JOB_TOKEN",
            file=sys.stderr,
        )
    try:
        job = load_job(args.job, overrides=args.set or (), smoke=True if args.smoke else None)
        command = "tune" if args.tune else "run"
        client, sid = submit(
            job, args.address, command=command, working_dir=args.working_dir,
            token=args.token, token_file=getattr(args, "token_file", None),
        )  # fmt: skip
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


# ------------------------------------------------------------------------ cluster side
def main(argv: list[str] | None = None) -> int:
    """The entrypoint on the cluster: ``python -m distcl.submit {run,tune} --job-name N``.

    Reads the job from ``$DISTCL_JOB_YAML``, writes it to a private temp file and hands it
    to ``distcl run`` (no live progress bar: logs are not a terminal) or ``distcl tune``.
    """
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
        check_job_name(job.name)
        storage.makedirs(job.run_dir.parent)  # nothing to create on an object store
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
        path = Path(d) / "job.yaml"  # never a path built from the job's name
        path.write_text(text)
        extra = ["--no-progress"] if args.command == "run" else []
        # A child process rather than cli.main(): the CLI imports this module (no cycle).
        cmd = [sys.executable, "-m", "distcl.cli", args.command, str(path), *extra]
        return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
