"""The embedded local Ray (distcl.localray) on real processes: it listens on loopback only,
runs with token auth, and its processes end with the driver even after a SIGKILL.

Each test starts a driver in a subprocess (so a kill cannot take pytest down), which
prints its session marker once Ray runs a task; the test then inspects the session's
processes through /proc.

Run: ``.venv/bin/python -m pytest tests/test_localray.py -q`` (marker ``ray``; Linux)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distcl.localray import is_loopback, listening_sockets, session_pids

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

ROOT = Path(__file__).resolve().parent.parent
DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from distcl.localray import current_session, init_ray
    import ray
    init_ray(num_cpus=1)
    ray.get([ray.remote(lambda: os.getpid()).remote() for _ in range(2)])
    time.sleep(2)  # the dashboard and runtime-env agents bind shortly after ray.init

    @ray.remote
    def state_api():  # where a worker's State API calls go (Ray Train's PG cleaner's do)
        from ray.dashboard.utils import get_address_for_submission_client
        try:
            return get_address_for_submission_client(None).rsplit(":", 1)[1]
        except Exception as e:
            return type(e).__name__
    port = ray.get(state_api.remote())
    print("READY", current_session(), os.environ.get("RAY_AUTH_MODE"), port, flush=True)
    time.sleep(600)
    """
)


@pytest.fixture(scope="module")
def sessions():
    """Two embedded Rays on the machine, started at once: ``driver``, and ``second`` beside
    it (the last test kills the second)."""
    with _drivers(2) as out:
        yield out


@pytest.fixture(scope="module")
def driver(sessions):
    return sessions[0]


@pytest.fixture(scope="module")
def second(sessions):
    return sessions[1]


@contextlib.contextmanager
def _drivers(n: int):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen(
        [sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, env=env, cwd=ROOT,
    ) for _ in range(n)]  # fmt: skip
    markers: list[str] = []
    try:
        out = []
        for proc in procs:  # READY <marker> <auth> <port>, or the driver ended without it
            ready = next((line.split() for line in proc.stdout if line.startswith("READY")), None)
            assert ready, "a driver did not start Ray"
            markers.append(ready[1])
            out.append((proc, *ready[1:]))
        yield out
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for marker in markers:  # never leave a session behind, whatever the test found
            for pid in session_pids(marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def test_embedded_ray_listens_on_loopback_only_with_token_auth(driver):
    proc, marker, auth, _ = driver
    pids = [proc.pid, *session_pids(marker)]
    socks = listening_sockets(pids)
    names = {name for _, name, _, _ in socks}
    print("\n".join(f"{ip}:{port}\t{name}" for _, name, ip, port in socks))
    # The GCS, the raylet, the dashboard and its agent, and a worker all listen somewhere.
    assert {"gcs_server", "raylet"} <= names and len(socks) >= 6, socks
    outside = [s for s in socks if not is_loopback(s[2])]
    assert not outside, f"non-loopback listeners: {outside}"
    assert auth == "token"


def test_workers_state_api_names_their_own_instance_beside_another(driver, second):
    """With two embedded Rays on one machine, each one's workers reach their own dashboard
    (Ray Train's placement-group cleaner otherwise fails, or asks the other instance and
    removes a live run's placement group)."""
    for proc, marker, _, api_port in (driver, second):
        ports = {port for _, name, _, port in listening_sockets([proc.pid, *session_pids(marker)])}
        assert api_port.isdigit() and int(api_port) in ports, api_port


def test_ray_processes_end_with_a_sigkilled_driver(driver, second):
    """Only the killed driver's session goes: the other embedded Ray lives on."""
    proc, marker, _, _ = second
    pids = session_pids(marker)
    assert len(pids) >= 5, pids  # gcs, raylet, dashboard, agents, workers
    t0 = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while session_pids(marker) and time.monotonic() - t0 < 20:
        time.sleep(0.2)
    left = session_pids(marker)
    assert not left, f"alive {time.monotonic() - t0:.0f}s after the driver's SIGKILL: {left}"
    alive = listening_sockets([driver[0].pid, *session_pids(driver[1])])
    assert driver[0].poll() is None and {"gcs_server", "raylet"} <= {s[1] for s in alive}


@pytest.mark.parametrize(
    "ip, loopback",
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("::ffff:127.0.0.1", True),
     ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("::ffff:10.0.0.1", False)],
)  # fmt: skip
def test_is_loopback(ip, loopback):
    assert is_loopback(ip) is loopback


def test_a_non_loopback_listener_is_refused_naming_it(monkeypatch):
    from distcl import localray

    socks = [(11, "gcs_server", "::ffff:127.0.0.1", 6379), (12, "raylet", "0.0.0.0", 40001)]
    monkeypatch.setattr(localray, "listening_sockets", lambda pids: socks)
    with pytest.raises(localray.LocalRayError, match=r"raylet \(pid 12\) on 0\.0\.0\.0:40001"):
        localray.check_loopback("no-such-session")
    monkeypatch.setattr(localray, "listening_sockets", lambda pids: socks[:1])
    assert localray.check_loopback("no-such-session") == socks[:1]
