"""``distcl submit`` / ``distcl jobs``: unit tests, and an end-to-end test on a real Ray head.

    .venv/bin/python -m pytest tests/test_submit.py -q -m "not slow"    # unit tests, seconds
    .venv/bin/python -m pytest tests/test_submit.py -q -m ray           # + the live head

The end-to-end tests start their own Ray head with ``ray start --head --block`` on
127.0.0.1 (dashboard on loopback, free ports, token authentication with a token made up
by the test, a private ``--temp-dir`` so no other Ray on the machine sees it or is seen),
submit jobs through the CLI exactly as a user would, and in teardown stop that head only:
SIGTERM to the ``ray start`` process, then SIGKILL to its process group and to any process
whose command line names the private temp dir. ``ray stop`` is never used: it would kill
every Ray on the machine.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from distcl import cli
from distcl import submit as sub
from distcl.config import ConfigError, parse_job

ROOT = Path(__file__).resolve().parents[1]

E2E_JOB = {
    "name": "e2e",
    "data": {"source": "synthetic", "synthetic_classes": 4, "synthetic_train_per_class": 32,
             "synthetic_test_per_class": 8, "shard_size": 40},
    "scenario": {"tasks": 2},
    "model": {"embedding_dim": 16},
    "method": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size_per_worker": 16, "workers": 1},
}  # fmt: skip


def _job(root: str = "/mnt/shared/runs", **extra):
    return parse_job({**E2E_JOB, "output": {"root": root}, **extra})


def _write_job(path: Path, root: Path | str, **extra) -> Path:
    path.write_text(yaml.safe_dump({**E2E_JOB, "output": {"root": str(root)}, **extra}))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------ addresses, tokens
@pytest.mark.parametrize("given, expected", [
    ("127.0.0.1:8265", "http://127.0.0.1:8265"),
    ("http://head:8265/", "http://head:8265"),
    ("  https://ray.example.org  ", "https://ray.example.org"),
])  # fmt: skip
def test_normalize_address(given, expected):
    assert sub.normalize_address(given) == expected


@pytest.mark.parametrize("bad, words", [
    ("", "empty"), ("ray://head:10001", "Ray Client"), ("ftp://head:21", "http(s)"),
    ("http://:8265", "http(s)"),
])  # fmt: skip
def test_normalize_address_rejects(bad, words):
    with pytest.raises(ValueError, match=r"--address") as e:
        sub.normalize_address(bad)
    assert words in str(e.value)


def test_token_order_flag_then_job_token_then_ray_token(monkeypatch):
    monkeypatch.delenv("RAY_JOB_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert sub.resolve_token(None) is None and sub.auth_headers(None) == {}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-tok")
    assert sub.resolve_token(None) == "ray-tok"
    monkeypatch.setenv("RAY_JOB_TOKEN", " job-tok\n")
    assert sub.resolve_token(None) == "job-tok"
    assert sub.resolve_token("flag-tok") == "flag-tok"
    assert sub.auth_headers("flag-tok") == {"Authorization": "Bearer flag-tok"}


def test_token_from_a_file_before_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_JOB_TOKEN", "env-tok")
    path = tmp_path / "tok"
    path.write_text("file-tok\n")
    assert sub.resolve_token(None, str(path)) == "file-tok"
    assert sub.resolve_token("flag-tok", str(path)) == "flag-tok"
    path.write_text("  \n")
    with pytest.raises(ValueError, match=rf"--token-file: {path} is empty"):
        sub.resolve_token(None, str(path))
    with pytest.raises(ValueError, match=r"--token-file: cannot read .*missing"):
        sub.resolve_token(None, str(tmp_path / "missing"))


@pytest.mark.parametrize("address, token, warned", [
    ("http://10.0.0.5:8265", "t", True),
    ("http://head.example.com:8265", "t", True),
    ("http://[2001:db8::1]:8265", "t", True),
    ("https://head.example.com:8265", "t", False),
    ("http://127.0.0.1:8265", "t", False),
    ("http://localhost:8265", "t", False),
    ("http://[::1]:8265", "t", False),
    ("http://10.0.0.5:8265", None, False),
])  # fmt: skip
def test_plain_http_token_to_another_host_is_warned(address, token, warned):
    warning = sub.token_transport_warning(address, token)
    assert (warning is not None) is warned
    if warned:
        assert "plain http://" in warning and "https://" in warning


def test_warning_and_token_file_reach_the_dashboard(tmp_path, fake_dashboard, capsys):
    address, dash = fake_dashboard
    dash.answers["/api/version"] = (200, '{"ray_version": "0.0.0"}')
    path = tmp_path / "tok"
    path.write_text("file-tok")
    job = _write_job(tmp_path / "job.yaml", "/mnt/shared/runs")
    args = SimpleNamespace(
        job=str(job),
        set=None,
        smoke=False,
        tune=False,
        address=address,
        wait=False,
        working_dir=str(ROOT),
        token=None,
        token_file=str(path),
    )  # fmt: skip (the parsed `distcl submit ... --token-file PATH`)
    # Loopback: no warning; the token from the file is the one sent.
    sub.submit_job(args)
    err = capsys.readouterr().err
    assert "plain http://" not in err and "on the command line" not in err
    assert "Bearer file-tok" in dash.seen_auth
    sub.submit_job(SimpleNamespace(**{**vars(args), "token": "flag-tok", "token_file": None}))
    assert "on the command line is visible" in capsys.readouterr().err
    assert "Bearer flag-tok" in dash.seen_auth


# ------------------------------------------------------------------------ what is shipped
@pytest.mark.parametrize("override, field, words", [
    ({"output": {"root": "runs"}}, "output.root", "relative"),
    ({"output": {"root": "file://runs"}}, "output.root", "relative"),
    ({"data": {**E2E_JOB["data"], "shards_dir": "shards"}}, "data.shards_dir", "relative"),
])  # fmt: skip
def test_cluster_paths_must_be_absolute_mounted_paths(override, field, words):
    job = parse_job({**E2E_JOB, "output": {"root": "/mnt/shared/runs"}, **override})
    with pytest.raises(ConfigError, match=re.escape(field)) as e:
        sub.check_cluster_paths(job)
    assert words in str(e.value)


def test_absolute_paths_pass():
    sub.check_cluster_paths(
        _job("/mnt/shared/runs", data={**E2E_JOB["data"], "shards_dir": "/mnt/shared/s"})
    )


def test_object_store_uris_pass():  # every node reaches them through distcl.storage
    sub.check_cluster_paths(
        _job("s3://bucket/runs", data={**E2E_JOB["data"], "shards_dir": "gs://b/s"})
    )


@pytest.mark.parametrize("name", ["..", "../escape", "/abs", "a/b", "a\\b", ".hidden", "-x", ""])
def test_job_names_that_escape_are_refused(name):
    with pytest.raises(ConfigError, match="name: "):
        sub.check_job_name(name)


def test_entrypoint_round_trips_through_the_cluster_side_parser():
    # Names are plain (config: [A-Za-z0-9][A-Za-z0-9._-]*), so quoting never changes them.
    job = parse_job({**E2E_JOB, "name": "my-job.v2", "output": {"root": "/r"}})
    entry = sub.build_entrypoint(job, "tune")
    assert entry == "python -m distcl.submit tune --job-name my-job.v2"
    with pytest.raises(ValueError, match="command"):
        sub.build_entrypoint(job, "eval")


def test_runtime_env_ships_the_folder_and_the_resolved_job(tmp_path):
    job = parse_job({**E2E_JOB, "output": {"root": "/r"}}, overrides=["train.lr=0.2"], smoke=True)
    env = sub.build_runtime_env(job, tmp_path)
    assert env["working_dir"] == str(tmp_path.resolve())
    assert "runs/" in env["excludes"]
    assert set(env["env_vars"]) == {sub.ENV_JOB}
    # The cluster rebuilds exactly the job validated here (overrides and smoke included).
    assert parse_job(yaml.safe_load(env["env_vars"][sub.ENV_JOB])) == job
    with pytest.raises(FileNotFoundError, match="--working-dir"):
        sub.build_runtime_env(job, tmp_path / "missing")


def test_ray_packages_the_project_without_ignored_files(tmp_path):
    """What Ray uploads for our runtime env: ignore files and our excludes honoured."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import create_package

    proj = tmp_path / "proj"
    secrets_ = (
        ".env", ".env.local", "deploy/prod.env", ".netrc", ".git-credentials", "tls/server.pem",
        "tls/server.key", "id_rsa", "id_ed25519.pub", ".aws/credentials", ".ssh/config",
        ".kube/config", ".docker/config.json", "keys/gcp-credentials.json", "credentials",
        "ray.token", "auth_token", ".ray/auth_token",
    )  # fmt: skip
    for rel in (
        "distcl/__init__.py",
        "jobs/a.yaml",
        "runs/e2e/model.pt",
        "data_cache/x.bin",
        "notes/secret.txt",
        "distcl.egg-info/PKG-INFO",
        "distcl/data/tokens.py",  # a name near a secret pattern: still shipped
        *secrets_,
    ):
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text("x")
    (proj / ".gitignore").write_text("notes/\n")
    env = sub.build_runtime_env(_job(), proj)
    create_package(
        env["working_dir"], tmp_path / "pkg.zip", include_gitignore=True, excludes=env["excludes"]
    )
    names = {n for n in ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert names == {"distcl/__init__.py", "distcl/data/tokens.py", "jobs/a.yaml", ".gitignore"}


def test_submission_ids_are_readable_and_unique():
    job = parse_job({**E2E_JOB, "name": "im_net.100", "output": {"root": "/r"}})
    ids = {sub.submission_id_for(job) for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(r"distcl-im_net\.100-\d{8}-\d{6}-[0-9a-f]{4}", i) for i in ids)


# ------------------------------------------------------------------------ a fake dashboard
class _Dashboard(http.server.BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, str]] = {}
    seen_auth: list[str | None] = []

    def do_GET(self):  # noqa: N802  (http.server's name)
        self.seen_auth.append(self.headers.get("Authorization"))
        code, body = self.answers.get(self.path, (404, "not found"))
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_dashboard():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    _Dashboard.answers, _Dashboard.seen_auth = {}, []
    yield f"http://127.0.0.1:{server.server_address[1]}", _Dashboard
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("code, body, words", [
    (401, "Unauthorized: Missing authentication token", "requires a token"),
    (403, "Forbidden: Invalid authentication token", "rejected the token"),
    (200, "<html>not ray</html>", "not a Ray dashboard"),
    (500, "boom", "HTTP 500"),
])  # fmt: skip
def test_dashboard_answers_become_clear_errors(fake_dashboard, code, body, words):
    address, handler = fake_dashboard
    handler.answers["/api/version"] = (code, body)
    with pytest.raises(sub.ClusterError, match=re.escape(words)) as e:
        sub.check_dashboard(address, "tok")
    assert address in str(e.value)
    assert handler.seen_auth == ["Bearer tok"]


def test_dashboard_version_is_returned(fake_dashboard):
    address, handler = fake_dashboard
    handler.answers["/api/version"] = (200, json.dumps({"ray_version": "2.60.0"}))
    assert sub.check_dashboard(address) == "2.60.0"
    assert handler.seen_auth == [None]


def test_silent_server_times_out_fast():
    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        address = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(
            sub.ClusterError, match="cannot reach the Ray dashboard at " + re.escape(address)
        ):
            sub.check_dashboard(address, timeout_s=0.5)
        assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------------------ the CLI, offline
def _submit_args(job: Path | str, address: str, *extra: str) -> list[str]:
    return ["submit", str(job), "--address", address, "--working-dir", str(ROOT), *extra]


def test_bad_job_file_fails_before_contacting_the_cluster(tmp_path, capsys, fake_dashboard):
    address, handler = fake_dashboard
    job = _write_job(
        tmp_path / "bad.yaml", tmp_path / "runs", train={**E2E_JOB["train"], "epochz": 1}
    )
    assert cli.main(_submit_args(job, address)) == sub.EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown field 'train.epochz'" in err and str(job) in err
    assert handler.seen_auth == []  # nothing was sent
    assert cli.main(_submit_args(tmp_path / "nope.yaml", address)) == sub.EXIT_USAGE
    assert "no such job file" in capsys.readouterr().err


def test_relative_output_root_is_refused_with_a_hint(tmp_path, capsys, fake_dashboard):
    address, handler = fake_dashboard
    job = _write_job(tmp_path / "j.yaml", "runs")
    assert cli.main(_submit_args(job, address)) == sub.EXIT_USAGE
    assert "--set output.root=/mnt/shared/distcl-runs" in capsys.readouterr().err
    assert handler.seen_auth == []


def test_tune_without_tune_section_is_refused(tmp_path, capsys, fake_dashboard):
    address, _ = fake_dashboard
    job = _write_job(tmp_path / "j.yaml", tmp_path / "runs")
    assert cli.main(_submit_args(job, address, "--tune")) == sub.EXIT_USAGE
    assert "tune: section" in capsys.readouterr().err


def test_wrong_address_fails_fast_naming_it(tmp_path, capsys):
    port = _free_port()  # nothing listens there
    job = _write_job(tmp_path / "j.yaml", tmp_path / "runs")
    t0 = time.perf_counter()
    rc = cli.main(_submit_args(job, f"127.0.0.1:{port}", "--wait"))
    assert rc == sub.EXIT_CLUSTER
    assert time.perf_counter() - t0 < 15
    err = capsys.readouterr().err
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in err
    assert "Connection refused" in err


def test_jobs_needs_an_id_except_for_list(capsys):
    assert cli.main(["jobs", "logs", "--address", "127.0.0.1:1"]) == sub.EXIT_USAGE
    assert "submission id is required" in capsys.readouterr().err


# ------------------------------------------------------------------------ following, tables
class _FakeClient:
    def __init__(self, statuses, chunks=("a\n", "b\n"), tail_error=None):
        self.statuses, self.chunks, self.tail_error = list(statuses), chunks, tail_error

    async def tail_job_logs(self, sid):
        for c in self.chunks:
            yield c
        if self.tail_error:
            raise self.tail_error

    def get_job_status(self, sid):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


def test_wait_streams_logs_then_returns_the_final_status(capsys):
    from ray.job_submission import JobStatus

    client = _FakeClient([JobStatus.RUNNING, JobStatus.SUCCEEDED])
    assert sub.wait_for_job(client, "id", out=sys.stdout, poll_s=0.01) == "SUCCEEDED"
    assert capsys.readouterr().out == "a\nb\n"


def test_wait_falls_back_to_polling_when_the_stream_breaks(capsys):
    client = _FakeClient(["RUNNING", "RUNNING", "FAILED"], tail_error=RuntimeError("ws"))
    assert sub.wait_for_job(client, "id", out=sys.stdout, poll_s=0.01) == "FAILED"
    assert "polling the status" in capsys.readouterr().err
    with pytest.raises(TimeoutError, match="still RUNNING"):
        sub.wait_for_job(_FakeClient(["RUNNING"]), "id", follow=False, poll_s=0.01, timeout_s=0.05)


def test_job_table_golden():
    jobs = [
        SimpleNamespace(
            submission_id="b",
            job_id=None,
            status="RUNNING",
            start_time=None,
            metadata=None,
            entrypoint="echo",
        ),
        SimpleNamespace(
            submission_id="distcl-e2e-1",
            job_id="02",
            status="SUCCEEDED",
            start_time=0,
            metadata={"distcl_job": "e2e"},
            entrypoint="python -m distcl.submit run --job-name e2e",
        ),
    ]
    # Column widths: the widest cell of each column (13, 9, 3, 7), two spaces between.
    assert sub.format_job_table(jobs).splitlines() == [
        "SUBMISSION ID  STATUS     JOB  STARTED  ENTRYPOINT",
        "b              RUNNING    -    -        echo",
        "distcl-e2e-1   SUCCEEDED  e2e  -        python -m distcl.submit run --job-name e2e",
    ]


# ------------------------------------------------------------------------ the cluster side
def test_cluster_side_hands_the_shipped_job_to_distcl_run(monkeypatch, capsys, tmp_path):
    job = _job(str(tmp_path / "runs"))
    seen = {}

    def fake_run(cmd, **kw):  # `python -m distcl.cli ARGV...`
        assert cmd[:3] == [sys.executable, "-m", "distcl.cli"]
        seen["argv"] = argv = cmd[3:]
        seen["job"] = parse_job(yaml.safe_load(Path(argv[1]).read_text()))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(sub.subprocess, "run", fake_run)
    monkeypatch.setenv(sub.ENV_JOB, sub.build_runtime_env(job, tmp_path)["env_vars"][sub.ENV_JOB])
    assert sub.main(["run", "--job-name", "e2e"]) == 0
    assert seen["argv"][0] == "run" and seen["argv"][2:] == ["--no-progress"]
    assert seen["job"] == job
    assert not Path(seen["argv"][1]).exists()  # the temp file is gone afterwards
    assert sub.main(["run", "--job-name", "other"]) == sub.EXIT_USAGE
    assert "holds job 'e2e', not 'other'" in capsys.readouterr().err
    monkeypatch.delenv(sub.ENV_JOB)
    assert sub.main(["tune", "--job-name", "e2e"]) == sub.EXIT_USAGE
    assert "DISTCL_JOB_YAML is empty" in capsys.readouterr().err


# ------------------------------------------------------------------------ a live Ray head
def _distcl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, with no token or Ray address from this environment."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_JOB_TOKEN", "RAY_AUTH_TOKEN", "RAY_ADDRESS")
    }
    return subprocess.run(
        [sys.executable, "-m", "distcl.cli", *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (the head's ``start_new_session``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid
            ):
                pids.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            pass
    return pids


@pytest.mark.ray
@pytest.mark.slow
def test_e2e_head_listens_on_loopback_only(ray_head):
    from distcl.localray import is_loopback, listening_sockets

    deadline = time.monotonic() + 60
    while True:  # the raylet and agents come up after the dashboard answers
        socks = listening_sockets(_session_pids(ray_head.pid))
        names = {name for _, name, _, _ in socks}
        if {"gcs_server", "raylet", "ray::DashboardA"} <= names or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {"gcs_server", "raylet"} <= names, socks
    assert [s for s in socks if not is_loopback(s[2])] == []


@pytest.mark.ray
@pytest.mark.slow
def test_e2e_token_is_required_and_checked(ray_head, tmp_path, monkeypatch, capsys):
    for name in ("RAY_JOB_TOKEN", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    job = _write_job(tmp_path / "e2e.yaml", tmp_path / "runs")
    assert cli.main(_submit_args(job, ray_head.address)) == sub.EXIT_CLUSTER
    assert f"the cluster at {ray_head.address} requires a token" in capsys.readouterr().err
    assert cli.main(_submit_args(job, ray_head.address, "--token", "wrong")) == 3
    assert "rejected the token" in capsys.readouterr().err
    assert cli.main(["jobs", "list", "--address", ray_head.address]) == sub.EXIT_CLUSTER
    assert "requires a token" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_e2e_template_without_data_fails_with_job_status(ray_head, tmp_path):
    """A template submitted to a cluster without its data: FAILED, exit 1, clear message."""
    template = ROOT / "jobs" / "templates" / "imagenet100.yaml"
    res = _distcl(
        *_submit_args(
            template,
            ray_head.address,
            "--smoke",
            "--wait",
            "--token",
            ray_head.token,
            "--set",
            f"output.root={tmp_path}",
        )
    )
    assert res.returncode == sub.EXIT_JOB_FAILED, res.stderr[-3000:]
    assert "FAILED" in res.stderr
    assert "data.root: /mnt/data/imagenet100 is not a folder" in res.stdout + res.stderr
