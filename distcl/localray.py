"""The embedded local Ray: loopback only, token auth on, and gone when its driver dies.

    from distcl.localray import init_ray
    init_ray()                          # $RAY_ADDRESS if set, else an embedded local Ray
    init_ray("ray://HEAD:10001")        # or any address ray.init accepts
    python -m distcl.localray sockets   # start one, print what it listens on, stop it

What Ray 2.60 does by itself, and what this module adds (checked on a live run, see
tests/test_localray.py):

- **Where it listens.** ``ray.init(_node_ip_address="127.0.0.1")`` is not enough: Ray
  rewrites a loopback node address to the host's routable one (``resolve_ip_for_localhost``),
  so the GCS, the raylet and every worker bind ``0.0.0.0``/``::`` and the dashboard agent
  and runtime-env agent bind the routable address. Ray's single-machine mode (the one it
  uses on macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) keeps the node address
  at 127.0.0.1, and the C++ servers then bind loopback only. We switch that mode on for the
  start of the embedded Ray only, then list the listening sockets of every process of the
  session and refuse to go on (shutting Ray down, naming the socket) if one is not loopback.
- **Token auth.** Ray 2.60 has token authentication (``RAY_AUTH_MODE=token``; the token from
  ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, generated there if
  missing). The embedded Ray always starts with it on.
- **Dying with the driver.** Ray ties the GCS and raylet to the driver, but after a SIGKILL
  of the driver its dashboard agent, runtime-env agent and idle workers live on. Every
  process of the session inherits a marker variable (``DISTCL_RAY_SESSION``); a small
  watchdog process (``python -m distcl.localray watch``) holds the read end of a pipe whose
  write end only the driver holds, so it wakes on the driver's exit however it happens
  (kernel closes the pipe) and SIGKILLs every process that carries the marker.

A cluster address (``address`` or ``$RAY_ADDRESS``) is used as is: its network exposure is
the cluster's own (see cluster/README.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

NAMESPACE = "distcl"
#: Inherited by every process of an embedded Ray session (value: a random id).
SESSION_ENV = "DISTCL_RAY_SESSION"
#: Ray's switch for its single-machine (loopback) mode, read at import and in children.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_session: str | None = None  # marker of the embedded session this process started


class LocalRayError(RuntimeError):
    """The embedded Ray cannot be started as required (e.g. not loopback-only)."""


# ------------------------------------------------------------------------ sockets
def _proc_listening() -> dict[str, tuple[str, int]]:
    """inode -> (ip, port) of every listening TCP socket of this host (Linux /proc)."""
    out: dict[str, tuple[str, int]] = {}
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != "0A":  # 0A: TCP_LISTEN
                continue
            hex_ip, hex_port = f[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out[f[9]] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return out


def listening_sockets(pids: Sequence[int]) -> list[tuple[int, str, str, int]]:
    """Listening TCP sockets of ``pids`` as sorted (pid, process name, ip, port)."""
    table = _proc_listening()
    found = set()
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in table:
                found.add((pid, name, *table[link[8:-1]]))
    return sorted(found, key=lambda r: (r[1], r[3], r[0]))


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def session_pids(marker: str, exclude: Sequence[int] = ()) -> list[int]:
    """Live processes whose environment carries ``DISTCL_RAY_SESSION=<marker>``."""
    needle = f"{SESSION_ENV}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in env.split(b"\0"):
            pids.append(int(entry))
    return pids


def current_session() -> str | None:
    """The marker of the embedded Ray this process started (None: none, or a cluster)."""
    return _session


# ------------------------------------------------------------------------ watchdog
def _watch(fd: int, marker: str, grace_s: float = 5.0) -> int:
    """Block until the driver's end of the pipe closes, then kill the session."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:  # repeat: a dying raylet may still spawn a worker
        pids = session_pids(marker, exclude=[os.getpid()])
        if not pids:
            return 0
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return 1


def _start_watchdog(marker: str) -> None:
    """Start the watchdog; its pipe's write end stays in this (the driver's) process."""
    read_fd, write_fd = os.pipe()  # non-inheritable: only pass_fds reaches the child
    env = {k: v for k, v in os.environ.items() if k != SESSION_ENV}  # not itself a target
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    subprocess.Popen(
        [sys.executable, "-m", "distcl.localray", "watch", str(read_fd), marker],
        pass_fds=[read_fd],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C or a group kill of the driver does not stop it
    )
    os.close(read_fd)
    _keep_open.append(write_fd)  # closed by the kernel when this process ends


_keep_open: list[int] = []


# ------------------------------------------------------------------------ init
@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the block, restored (or removed) after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _loopback_patch():
    """Ray's single-machine mode for this process: its node address stays 127.0.0.1."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise LocalRayError(
            "this Ray release has no single-machine mode (ray_constants.ENABLE_RAY_CLUSTER), "
            "so an embedded Ray would listen on every interface; start a head with `ray "
            "start --head` on a trusted network and pass its address (--address / "
            "$RAY_ADDRESS) instead"
        )
    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    return lambda: setattr(ray_constants, "ENABLE_RAY_CLUSTER", old)


def _enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process (Ray's C++ config re-read) and its children."""
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError as e:
        raise LocalRayError(
            f"this Ray release has no token authentication ({e}); the embedded Ray needs it"
        ) from None
    _enable_token_auth()  # sets os.environ["RAY_AUTH_MODE"] and re-reads Ray's config


def check_loopback(marker: str) -> list[tuple[int, str, str, int]]:
    """The session's listening sockets; raises LocalRayError on a non-loopback one."""
    socks = listening_sockets(session_pids(marker) + [os.getpid()])
    bad = [s for s in socks if not is_loopback(s[2])]
    if bad:
        listed = ", ".join(f"{name} (pid {pid}) on {ip}:{port}" for pid, name, ip, port in bad)
        raise LocalRayError(
            f"the embedded Ray listens beyond loopback: {listed}. This Ray release cannot "
            "be confined to 127.0.0.1 here; refusing to run. Start a head yourself (`ray "
            "start --head`, firewalled) and pass its address (--address / $RAY_ADDRESS)"
        )
    return socks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_config(num_cpus: int | None = None) -> dict:
    """Ray settings of an embedded instance (``ray.init(_system_config=...)``).

    ``num_workers_soft_limit``: Ray keeps idle worker processes for reuse while it has at
    most this many workers, actors counted (default: the CPU count), and kills the rest
    after a second idle. A Train run's actors (its workers, which hold the CPUs, the
    controller, the synchronization actor, memory shards, the progress board) are enough
    to go over it, so every run cost the evaluation after it its warm workers: a fresh
    process and imports per task, ~3 s of a small run's evaluation on 2 cores against
    ~0.4 s warm. The limit leaves room for as many actors as CPUs plus 8, so idle task
    workers stay as Ray keeps them when no actor runs (tests/test_engine.py)."""
    cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
    return {"num_workers_soft_limit": 2 * int(cpus) + 8}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or $RAY_ADDRESS), else start an embedded local Ray that
    listens on loopback only, with token auth, and ends with this process."""
    import ray

    global _session
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        ray.init(
            address=address, namespace=NAMESPACE, runtime_env=runtime_env, logging_level="WARNING"
        )
        return
    while _keep_open:  # a previous embedded session was shut down: release its watchdog
        os.close(_keep_open.pop())
    marker = secrets.token_hex(8)
    _enable_token_auth()
    restore = _loopback_patch()
    # The dashboard (Ray's UI and its State API) binds 127.0.0.1 too. Its port is chosen here
    # so that the workers' State API calls name THIS instance: left to find one, a call fails
    # ("Found multiple active Ray instances") when another Ray runs on the machine, or asks
    # the newest instance (stack-notes). Ray Train's placement-group cleaner did the latter,
    # missed a live controller there and removed the group of a running Train run (seen with
    # two runs at once); distcl's runs no longer start it (distcl.train.groups).
    dashboard_port = _free_port()
    runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    try:
        with scoped_env({_SINGLE_MACHINE_ENV: "0", SESSION_ENV: marker}):
            ray.init(
                address="local",  # always a new instance, never a `ray start` left running
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                namespace=NAMESPACE,
                _node_ip_address="127.0.0.1",
                logging_level="WARNING",
                runtime_env=runtime_env,
                _system_config=system_config(num_cpus),
            )
    finally:
        restore()
    _session = marker
    if sys.platform.startswith("linux"):
        _start_watchdog(marker)
        try:
            check_loopback(marker)
        except LocalRayError:
            ray.shutdown()
            _session = None
            raise


def main(argv: list[str] | None = None) -> int:
    """``python -m distcl.localray {watch FD MARKER | sockets}``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["watch"] and len(argv) == 3:
        return _watch(int(argv[1]), argv[2])
    if argv[:1] == ["sockets"]:
        import ray

        init_ray(num_cpus=1)
        ray.get(ray.remote(lambda: 0).remote())  # one worker up
        time.sleep(2)  # the agents bind a moment after ray.init returns
        for pid, name, ip, port in listening_sockets([os.getpid(), *session_pids(_session or "")]):
            print(f"{ip}:{port}\t{name}\t(pid {pid})")
        ray.shutdown()
        return 0
    print("usage: python -m distcl.localray {watch FD MARKER | sockets}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
