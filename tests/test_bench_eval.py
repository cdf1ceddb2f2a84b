"""``distcl bench eval`` runs end to end on a tiny store and reports consistent figures (no
timing assertions: benchmarks report, tests check they run and agree).

Run: ``.venv/bin/python -m pytest tests/test_bench_eval.py -q``
"""

from __future__ import annotations

import pytest

from distcl.bench.evalcost import format_eval_bench, main, run_eval_bench


def test_bench_eval_tiny_run_reports_the_matrix_and_ivfpq_per_nprobe(tmp_path):
    r = run_eval_bench(rows=3000, probes=40, tasks=2, dim=8, ivfpq_rows=4000,
                       workdir=str(tmp_path), nprobes=(1, 4096))  # fmt: skip
    assert r["pairs"] == 3 and r["gallery"] + r["probes"] >= 3000
    assert r["engine_s"] > 0 and r["raw_faiss_s"] > 0 and r["peak_rss_mb"] > 0
    assert len(r["cmc@1_diag"]) == 2 and all(0 <= v <= 1 for v in r["cmc@1_diag"])
    low, every = r["ivfpq"]
    assert (low["nprobe"], every["nprobe"]) == (1, 4096) and low["rows"] == 4000
    # probing every list leaves only the PQ codes' error: recall can only go up
    assert 0 <= low["recall@10"] <= every["recall@10"] <= 1
    text = format_eval_bench(r)
    assert "nprobe 1:" in text and "nprobe 4096:" in text and "ratio raw / engine" in text
    assert list(tmp_path.iterdir()) == []  # the stores lived in temp folders under workdir


def test_bench_eval_rejects_a_bad_nprobe_list(capsys):
    with pytest.raises(SystemExit):
        main(["--nprobe", "16,x"])
    assert "--nprobe" in capsys.readouterr().err


def test_the_openset_distractor_bench_runs_small(tmp_path):
    """``distcl bench eval --distractors N`` end to end, small: the engine's openset matrix
    and raw faiss on the same pairs, figures that add up (no timing assertion)."""
    from distcl.bench.evalcost import format_openset_bench, run_openset_bench

    r = run_openset_bench(distractors=3000, probes=200, tasks=2, dim=16, workdir=str(tmp_path))
    assert r["pairs"] == 3 and r["mated"] > 0 and r["nonmated"] > 0
    assert r["ratio_raw_over_engine"] == pytest.approx(r["raw_faiss_s"] / r["engine_s"])
    assert set(r["last_row"]) == {"rank1", "tpir@fpir=1e-3", "tpir@fpir=1e-2", "tpir@fpir=1e-1"}
    assert "ratio raw / engine" in format_openset_bench(r)
