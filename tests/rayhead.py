"""A real Ray head for the tests that need a cluster: ``ray start --head --block`` on
127.0.0.1 (dashboard on loopback, free ports, token authentication with a token made up by
the test, a private ``--temp-dir`` so no other Ray on the machine sees it or is seen).
Teardown stops that head only: SIGTERM to the ``ray start`` process, then SIGKILL to its
process group and to any process whose command line names the private temp dir. ``ray
stop`` is never used: it would kill every Ray on the machine.

    from rayhead import ray_head  # noqa: F401  (in conftest.py: the session's head)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from distcl import submit as sub


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_naming(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop only the head this test started (never `ray stop`: it stops every Ray here)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its processes down
        try:  # it often takes > 10 s (the suite's durations): the kills below finish it
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
    except (ProcessLookupError, PermissionError):
        pass
    # Until none is left: a process killed a moment ago may still be exiting, and one its
    # raylet was starting as the kills came may appear after a scan.
    kill_until_gone(lambda: _pids_naming(temp_dir))
    proc.wait(timeout=10)


def kill_until_gone(find, seconds: float = 10.0) -> None:
    """SIGKILL the pids ``find()`` lists, again and again, until it lists none (or
    ``seconds`` pass: the caller checks what is left)."""
    deadline = time.monotonic() + seconds
    while (left := find()) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_head():
    """A Ray head on 127.0.0.1 (see the module docstring): address, token, temp_dir, pid.
    One per test session: the submit and load tests share it (a head costs seconds).

    On a loaded machine `ray start` can give up on its dashboard ("Failed to start the
    dashboard", after ~90 s: seen with a tuning search beside the suite); the head is then
    stopped and started once more, with fresh ports and folder."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("the `ray` command is not installed next to this Python")
    for attempt in (1, 2):
        head = _start_head(ray_bin)
        if isinstance(head, tuple):
            break
        if attempt == 2:
            raise RuntimeError(head)
        print(f"\nthe Ray head did not start (attempt 1), starting it again:\n{head[-1500:]}")
    proc, info, log = head
    try:
        yield info
    finally:
        _stop_head(proc, info.temp_dir)
        log.close()
        assert _pids_naming(info.temp_dir) == []
        shutil.rmtree(info.temp_dir, ignore_errors=True)


def _start_head(ray_bin: Path):
    """(process, SimpleNamespace(address, token, temp_dir, pid), log file) of a head that
    answers, or the reason (text) it did not start, with everything it started stopped."""
    temp_dir = tempfile.mkdtemp(prefix="dclray", dir="/tmp")  # short: unix socket paths
    token = os.urandom(16).hex()
    ports = {
        name: _free_port()
        for name in (
            "port",
            "dashboard-port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        # Ray's single-machine mode: without it a head given --node-ip-address=127.0.0.1
        # still binds the GCS/raylet to every interface (distcl.localray explains).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # Its processes ask its own dashboard (Ray Train's placement-group cleaner does).
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{ports['dashboard-port']}",
        # The entrypoint runs the cluster's `python`: this interpreter's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    cmd = [
        str(ray_bin),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--include-log-monitor=false",
        *(f"--{k}={v}" for k, v in ports.items()),
    ]
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 (closed by the caller)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.monotonic() + 120
    while True:
        try:
            sub.check_dashboard(address, token, timeout_s=2)
            info = SimpleNamespace(address=address, token=token, temp_dir=temp_dir, pid=proc.pid)
            return proc, info, log
        except sub.ClusterError:
            if proc.poll() is not None or time.monotonic() > deadline:
                reason = "the Ray head did not start:\n" + (
                    Path(temp_dir) / "head.log").read_text()[-3000:]  # fmt: skip
                _stop_head(proc, temp_dir)
                log.close()
                shutil.rmtree(temp_dir, ignore_errors=True)
                return reason
            time.sleep(1)
