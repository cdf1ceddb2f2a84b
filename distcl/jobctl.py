"""Talking to a Ray dashboard: address, token, reachability probe; ``distcl jobs
{list,status,logs,stop}``; following a submitted job to its end.

    distcl jobs list --address http://HEAD:8265
    distcl jobs logs distcl-imagenet100-20260101-120000-ab12 --address http://HEAD:8265
    distcl jobs stop ID --address http://HEAD:8265

The token comes from ``--token``, ``--token-file``, ``$RAY_JOB_TOKEN`` or ``$RAY_AUTH_TOKEN``
(see :mod:`distcl.submit`). Tested by ``tests/test_submit.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: Environment variables read for the auth token, in order (after the flags).
TOKEN_ENV = ("RAY_JOB_TOKEN", "RAY_AUTH_TOKEN")
EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_CLUSTER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
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


def resolve_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """The auth token: ``token``, else the file ``token_file``, else ``$RAY_JOB_TOKEN``,
    else ``$RAY_AUTH_TOKEN``. A token file that is missing or empty is a ValueError."""
    if token:
        return token.strip()
    if token_file:
        path = Path(token_file).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise ValueError(f"--token-file: cannot read {path} ({e.strerror})") from None
        if not text:
            raise ValueError(f"--token-file: {path} is empty")
        return text
    for name in TOKEN_ENV:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    return None


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (names other than localhost are not resolved)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_transport_warning(address: str, token: str | None) -> str | None:
    """A warning when ``token`` would travel in clear text beyond this machine."""
    url = urlparse(address)
    if not token or url.scheme != "http" or is_loopback_host(url.hostname or ""):
        return None
    return (
        f"distcl: warning: the token is sent over plain http:// to {url.hostname}, readable "
        "by anyone on the network path; use https:// (TLS in front of the dashboard) or a "
        "tunnel to 127.0.0.1 (`ray dashboard CLUSTER.yaml`, `kubectl port-forward`)"
    )


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


def connect(
    address: str, token: str | None = None, log: TextIO = sys.stderr, token_file: str | None = None
):
    """A ``JobSubmissionClient`` for ``address``, after a fast reachability probe."""
    import ray
    from ray.job_submission import JobSubmissionClient

    address = normalize_address(address)
    token = resolve_token(token, token_file)
    warning = token_transport_warning(address, token)
    if warning:
        print(warning, file=log)
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
        client = connect(args.address, args.token, token_file=getattr(args, "token_file", None))
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
