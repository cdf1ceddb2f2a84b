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
  start of the embedded Ray only (:func:`distcl.raycompat.loopback_only`), then list the
  listening sockets of every process of the session and refuse to go on (shutting Ray
  down, naming the socket) if one is not loopback.
- **Token auth.** Ray 2.60 has token authentication (``RAY_AUTH_MODE=token``; the token from
  ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, generated there if
  missing). The embedded Ray always starts with it on (:func:`distcl.raycompat.
  enable_token_auth`).
- **Dying with the driver.** Ray ties the GCS and raylet to the driver, but after a SIGKILL
  of the driver its dashboard agent, runtime-env agent and idle workers live on. Every
  process of the session inherits a marker variable (``DISTCL_RAY_SESSION``); a small
  watchdog process (``python -m distcl.localray watch``) holds the read end of a pipe whose
  write end only the driver holds, so it wakes on the driver's exit however it happens
  (kernel closes the pipe; it also polls the driver's pid, in case a forked process kept a
  copy of the write end), then SIGKILLs every process that carries the marker, again and
  again until none has been seen for 2 s (a dying raylet may still be starting an agent or
  a worker). Checked after every kill of tests/test_faults.py: nothing of the session is
  left within 15 s.

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
#: Where a Ray process finds the State API (the dashboard) of its own instance: Ray's
#: placement-group cleaner asks it, and left to guess on a machine with several Ray
#: instances it asks the newest one (distcl.train.trainer).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"

_session: str | None = None  # marker of the embedded session this process started
_api_server: str | None = None  # the dashboard URL of the embedded Ray this process started


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


def dashboard_url() -> str | None:
    """The dashboard (State API) of the embedded Ray this process started, for State API
    calls from this process (``ray.util.state.list_actors(address=...)``); None otherwise."""
    return _api_server


# ------------------------------------------------------------------------ watchdog
def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot; with its pid, its identity), or None
    when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _watch(fd: int, marker: str, driver: int, grace_s: float = 30.0, quiet_s: float = 2.0) -> int:
    """Wait for the driver to end, then kill the session's processes until none is left.

    The driver's end is seen two ways: the pipe's write end closing (the kernel closes it
    whatever kills the driver) and, every half second, the driver's pid gone or reused (in
    case a copy of the write end lives on in a process forked from the driver). Then every
    process carrying the session's marker is SIGKILLed, again and again (a dying raylet may
    still spawn a worker, an agent may be starting) until none has been seen for
    ``quiet_s``, for at most ``grace_s``."""
    import select

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    born = _start_time(driver)
    while born is not None and _start_time(driver) == born:
        try:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready and not os.read(fd, 1):
                break  # EOF: the driver's end closed
        except OSError:
            break
    deadline = time.monotonic() + grace_s
    last_seen = time.monotonic()
    while time.monotonic() < deadline:
        pids = session_pids(marker, exclude=[os.getpid()])
        if pids:
            last_seen = time.monotonic()
        elif time.monotonic() - last_seen >= quiet_s:
            return 0
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return 1


def _start_watchdog(marker: str) -> None:
    """Start the watchdog; its pipe's write end stays in this (the driver's) process."""
    read_fd, write_fd = os.pipe()  # non-inheritable: only pass_fds reaches the child
    env = {k: v for k, v in os.environ.items() if k != SESSION_ENV}  # not itself a target
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distcl.localray",
            "watch",
            str(read_fd),
            marker,
            str(os.getpid()),
        ],  # fmt: skip
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
    listens on loopback only, with token auth, and ends with this process. ``local`` (Ray's
    word for a new instance on this machine) starts the embedded one too."""
    import ray

    from distcl import raycompat  # Ray's release checked; its two non-public switches

    global _session, _api_server
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address and address != "local":
        _api_server = None
        ray.init(
            address=address, namespace=NAMESPACE, runtime_env=runtime_env, logging_level="WARNING"
        )
        return
    while _keep_open:  # a previous embedded session was shut down: release its watchdog
        os.close(_keep_open.pop())
    marker = secrets.token_hex(8)
    raycompat.enable_token_auth()
    # The dashboard (Ray's UI and its State API) binds 127.0.0.1 too. Its port is chosen here
    # so that the workers' State API calls name THIS instance: left to find one, a call fails
    # ("Found multiple active Ray instances") when another Ray runs on the machine, or asks
    # the newest instance (stack-notes). Ray Train's placement-group cleaner did the latter,
    # missed a live controller there and removed the group of a running Train run (seen with
    # two runs at once).
    dashboard_port = _free_port()
    api_server = f"http://127.0.0.1:{dashboard_port}"
    runtime_env["env_vars"][API_SERVER_ENV] = api_server  # its workers and actors
    with raycompat.loopback_only(), scoped_env({SESSION_ENV: marker}):
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
    _session = marker
    # Not set in this process's environment: Ray's job-submission client reads the variable
    # too, and would send `distcl submit --address ...` from here to this Ray instead.
    _api_server = api_server
    if sys.platform.startswith("linux"):
        _start_watchdog(marker)
        try:
            check_loopback(marker)
        except LocalRayError:
            ray.shutdown()
            _session = None
            raise


def main(argv: list[str] | None = None) -> int:
    """``python -m distcl.localray {watch FD MARKER PID | sockets}``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["watch"] and len(argv) == 4:
        return _watch(int(argv[1]), argv[2], int(argv[3]))
    if argv[:1] == ["sockets"]:
        import ray

        init_ray(num_cpus=1)
        ray.get(ray.remote(lambda: 0).remote())  # one worker up
        time.sleep(2)  # the agents bind a moment after ray.init returns
        for pid, name, ip, port in listening_sockets([os.getpid(), *session_pids(_session or "")]):
            print(f"{ip}:{port}\t{name}\t(pid {pid})")
        ray.shutdown()
        return 0
    print("usage: python -m distcl.localray {watch FD MARKER PID | sockets}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
