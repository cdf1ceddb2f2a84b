"""``distcl doctor``: passes on this machine, and each failure names its fix.

Run: ``.venv/bin/python -m pytest tests/test_doctor.py -q``
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distcl import doctor as dr
from distcl import raycompat

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.ray
def test_doctor_passes_here(tmp_path):
    """The whole command, as a user runs it: exit 0 and one line per check."""
    proc = subprocess.run(
        [sys.executable, "-m", "distcl.cli", "doctor", "--set", f"output.root={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("version ray", "process group gloo", "ddp step gloo", "data root",
                 "output root", "ray loopback"):  # fmt: skip
        (line,) = [ln for ln in lines if ln.startswith(name)]
        assert line.split()[len(name.split())] == "ok", line
    assert "all checks passed" in proc.stdout
    assert not list(tmp_path.glob(".doctor-*"))  # the probe file is gone


def test_a_missing_data_root_fails_naming_the_field(synthetic_job, tmp_path):
    job = synthetic_job(data={"source": "fashion-mnist", "root": str(tmp_path / "nothing")})
    check = dr.check_data_root(job)
    assert check.ok is False and "data.root" in check.fix
    job = synthetic_job(data={"source": "image-folder", "root": str(tmp_path / "nothing")})
    check = dr.check_data_root(job)
    assert check.ok is False and "data.root" in check.detail and "ImageFolder" in check.fix


def test_a_non_writable_output_root_fails_with_its_fix(synthetic_job, tmp_path):
    blocker = tmp_path / "a-file"  # a folder cannot be made where a file is (even as root)
    blocker.write_text("x")
    check = dr.check_output_root(synthetic_job(output={"root": str(blocker / "runs")}))
    assert check.ok is False and "output.root" in check.fix
    assert dr.check_output_root(synthetic_job(output={"root": str(tmp_path)})).ok is True


def test_a_ray_outside_the_range_fails_naming_the_range():
    (ray_check,) = [c for c in dr.check_versions(ray_version="2.59.0") if c.name == "version ray"]
    assert ray_check.ok is False
    assert raycompat.SUPPORTED_RAY in ray_check.detail and raycompat.SUPPORTED_RAY in ray_check.fix
    (ok,) = [c for c in dr.check_versions() if c.name == "version ray"]
    assert ok.ok is True


def test_the_declared_ranges_are_pyprojects():
    declared = dr.declared_requirements()
    assert declared["ray"] == str(
        __import__("packaging.specifiers").specifiers.SpecifierSet(raycompat.SUPPORTED_RAY)
    )
    assert "torch" in declared and "pyarrow" in declared


def test_a_failure_makes_the_exit_status_1_and_prints_the_fix(synthetic_job, monkeypatch):
    job = synthetic_job()
    bad = dr.Check("data root", False, "data.root '/x' is not a folder", "set data.root")
    monkeypatch.setattr(dr, "node_checks", lambda job: [dr.Check("version ray", True, "2.60"), bad])
    monkeypatch.setattr(dr, "check_loopback", lambda: dr.Check("ray loopback", None, "skipped"))
    out: list[str] = []
    assert dr.doctor(job, log=out.append) == 1
    text = "\n".join(out)
    assert "FAIL" in text and "fix: set data.root" in text and "1 check(s) failed" in text
    monkeypatch.setattr(dr, "node_checks", lambda job: [dr.Check("version ray", True, "2.60")])
    assert dr.doctor(job, log=out.append) == 0


@pytest.mark.ray
@pytest.mark.usefixtures("shared_ray")
def test_on_a_cluster_every_node_runs_the_checks(synthetic_job, tmp_path):
    """``--address``: one task per node of the connected Ray (here: the session's, 1 node)."""
    tables = dr.run_on_cluster(synthetic_job(output={"root": str(tmp_path)}))
    ((node, checks),) = tables.items()
    by_name = {c.name: c for c in checks}
    assert by_name["process group gloo"].ok and by_name["ddp step gloo"].ok, by_name
    assert by_name["data root"].ok is None and by_name["output root"].ok  # synthetic data
    assert "ray loopback" not in by_name  # a cluster's exposure is its own
