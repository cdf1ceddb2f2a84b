"""A real MLflow tracking server for the tests: ``mlflow server`` of ``.venv-mlflow`` (full
mlflow, installed by ``make setup``: its pins would downgrade .venv) on 127.0.0.1, a free
port, a SQLite backend and proxied artifacts in a temp folder.

    def test_x(mlflow_server):
        uri = mlflow_server.uri               # http://127.0.0.1:<port>
        mlflow_server.stop()                  # the server gone (fault tests)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = Path(os.environ.get("MLFLOW_VENV", ROOT / ".venv-mlflow")) / "bin" / "mlflow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, timeout: float = 300.0) -> SimpleNamespace:
    """Start a server (its own process group) and wait for /health."""
    if not MLFLOW.exists():
        raise RuntimeError(f"{MLFLOW}: no MLflow server installed; run `make setup` "
                           "(scripts/setup.sh installs it into .venv-mlflow)")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # fmt: skip
    log = open(folder / "server.log", "wb")  # noqa: SIM115  (the server's lifetime)
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"the MLflow server did not start: {folder / 'server.log'}")
        time.sleep(0.2)

    return SimpleNamespace(uri=uri, proc=proc, folder=folder, stop=lambda: stop(proc))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
