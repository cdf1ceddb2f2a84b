"""Evaluation of a run directory from stored embeddings (no Ray, no training):
compatibility matrices, the stale-gallery protocol, the faiss top-k path and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference import topk_summary

from distcl.config import dump_job
from distcl.data.scenario import build_scenario
from distcl.eval import compat
from distcl.eval.evaluate import evaluate_run
from distcl.eval.metrics import retrieval_summary
from distcl.gallery.index import build_index
from distcl.gallery.store import read_embeddings, write_embeddings


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def fake_run(synthetic_job):
    """A 3-task run whose models embed items as class centre + model-specific drift."""
    job = synthetic_job(name="fake", data={"synthetic_classes": 6}, scenario={"tasks": 3})
    rng = np.random.default_rng(0)
    test_labels = np.repeat(np.arange(6), 8)
    scen = build_scenario(np.repeat(np.arange(6), 32), test_labels, job.scenario, job.seed)
    run = job.run_dir
    (run / "models").mkdir(parents=True)
    (run / "job.yaml").write_text(dump_job(job))
    (run / "scenario.json").write_text(json.dumps(scen.to_json()))
    centres = rng.normal(size=(6, 8))
    ids = np.array([f"test-{i:07d}" for i in scen.eval_items])
    labels = test_labels[scen.eval_items]
    arrival = {int(i): t.index for t in scen.tasks for i in t.gallery_items}
    tasks = np.array([arrival[int(i)] for i in scen.eval_items])
    noise = rng.normal(size=(len(ids), 8))
    embs = []
    for t in range(3):
        drift = rng.normal(scale=0.6 * t, size=(6, 8))  # later models drift away
        emb = _unit(centres[labels] + drift[labels] + 0.5 * noise)
        embs.append(emb)
        write_embeddings(run / "eval" / "embeddings", t, "eval", ids, labels, tasks, emb)
        here = tasks == t
        write_embeddings(
            run / "gallery", t, f"task{t}", ids[here], labels[here], tasks[here], emb[here]
        )
        (run / "models" / str(t)).mkdir()
        (run / "models" / str(t) / "done.json").write_text("{}")
    return run, scen, ids, labels, tasks, embs


def test_matrices_and_summaries_match_direct_computation(fake_run):
    run, scen, ids, labels, tasks, embs = fake_run
    result = evaluate_run(run, log=lambda *a: None)
    direct = compat.compatibility_matrices(embs, labels, ("cmc@1", "map"))
    got = np.asarray(result["protocols"]["all"]["matrices"]["cmc@1"], dtype=float)
    np.testing.assert_allclose(got, direct["cmc@1"], equal_nan=True)
    s = result["protocols"]["all"]["summary"]
    assert s["ac"] == pytest.approx(compat.average_compatibility(direct["cmc@1"]))
    assert s["am"] == pytest.approx(compat.average_multimodel_accuracy(direct["cmc@1"]))
    assert result["embedding_passes"] == 3
    # seen protocol: pair (i, j) restricted to the classes model j had seen
    seen = [np.isin(labels, scen.tasks[t].seen_classes) for t in range(3)]
    direct_seen = compat.compatibility_matrices(embs, labels, ("cmc@1",), seen_masks=seen)
    got_seen = np.asarray(result["protocols"]["seen"]["matrices"]["cmc@1"], dtype=float)
    np.testing.assert_allclose(got_seen, direct_seen["cmc@1"], equal_nan=True)
    for name in ("report.md", "metrics.json", "compat_all.png", "compat_seen.png", "curves.png"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    assert "AC=" in report and ("✗" in report or "✓" in report)


def test_stale_gallery_uses_each_items_arrival_model(fake_run):
    run, scen, ids, labels, tasks, embs = fake_run
    result = evaluate_run(run, log=lambda *a: None)
    for s, row in enumerate(result["stale_gallery"]):
        here = tasks <= s
        g_emb = np.concatenate([embs[t][tasks == t] for t in range(s + 1)])
        g_lab = np.concatenate([labels[tasks == t] for t in range(s + 1)])
        g_ids = np.concatenate([ids[tasks == t] for t in range(s + 1)])
        order = np.argsort(g_ids)
        g_emb, g_lab, g_ids = g_emb[order], g_lab[order], g_ids[order]
        q_emb = embs[s][np.searchsorted(ids, g_ids)]  # ids are sorted in the fixture
        exp = retrieval_summary(q_emb, g_lab, g_emb, g_lab, exclude_self=True)
        assert row["gallery"] == int(here.sum())
        assert row["cmc@1"] == pytest.approx(exp["cmc@1"])
        assert row["map"] == pytest.approx(exp["map"])
        assert row["models_in_gallery"] == list(range(s + 1))
    # nothing was re-embedded: each stored row is its arrival model's embedding
    g = read_embeddings(run / "gallery")
    assert np.array_equal(g.models, g.tasks)


def test_faiss_topk_path_equals_exact_metrics_without_ties():
    rng = np.random.default_rng(3)
    emb = _unit(rng.normal(size=(300, 16)))
    lab = rng.integers(0, 10, 300)
    ids = np.array([f"i{k}" for k in range(300)])
    index = build_index(emb, kind="flat", use_gpu=False)
    got = topk_summary(emb, ids, lab, index, ids, lab, ks=(1, 5, 10))
    exp = retrieval_summary(
        emb, lab, emb, lab, exclude_self=True, topk=(1, 5), recall_ks=(1, 5, 10)
    )
    for k in ("cmc@1", "cmc@5", "recall@10"):
        assert got[k] == pytest.approx(exp[k]), k


def test_evaluating_an_empty_run_is_a_clear_error(synthetic_job):
    job = synthetic_job(name="empty")
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "job.yaml").write_text(dump_job(job))
    scen = build_scenario(np.repeat(np.arange(8), 4), np.repeat(np.arange(8), 2), job.scenario, 0)
    (job.run_dir / "scenario.json").write_text(json.dumps(scen.to_json()))
    with pytest.raises(ValueError, match="no finished task"):
        evaluate_run(job.run_dir)


def test_compare_table_and_figure_from_evaluated_runs(fake_run, synthetic_job, tmp_path):
    from distcl.eval.compare import _row, compare_table, plot_side_by_side

    run, *_ = fake_run
    result = evaluate_run(run, log=lambda *a: None)
    for t in range(3):
        history = [{"epoch": 0, "epoch_s": 4.0 + t}, {"epoch": 1, "epoch_s": 6.0}]
        (run / "models" / str(t) / "history.json").write_text(json.dumps(history))
    job = synthetic_job(name="fake", data={"synthetic_classes": 6}, scenario={"tasks": 3})
    row = _row(job, result)
    s = result["protocols"]["all"]["summary"]
    assert row["ac_all"] == s["ac"] and row["am_all"] == s["am"]
    assert row["train_s"] == 33.0
    M = np.asarray(result["protocols"]["all"]["matrices"]["cmc@1"], dtype=float)
    assert row["final_cmc@1"] == M[-1, -1]
    for proto in ("all", "seen"):  # AC again on the mAP matrix, from the strict ECC
        P = np.asarray(result["protocols"][proto]["matrices"]["map"], dtype=float)
        passed = [P[i, j] > P[j, j] for i in range(3) for j in range(i)]
        assert row[f"ac_{proto}_map"] == pytest.approx(sum(passed) / 3)
    table = compare_table([row, {**row, "job": "other"}], "cmc@1")
    assert table.count("\n") == 3 and "| fake | finetune |" in table
    plot_side_by_side([("fake", result), ("other", result)], tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_compare_refuses_jobs_on_different_scenarios(synthetic_job, tmp_path):
    from distcl.pipeline import compare_jobs

    a = synthetic_job(name="a")
    b = synthetic_job(name="b", seed=1)
    with pytest.raises(ValueError, match="do not share data/scenario/seed"):
        compare_jobs([a, b], tmp_path / "out")


def test_compare_over_seeds_gives_mean_and_sample_std():
    from distcl.eval.compare import aggregate, compare_table

    rows = [{"job": f"fm-hoc-s{s}", "method": "hoc", "ac_all": v, "am_all": 0.5, "train_s": t}
            for s, v, t in ((0, 0.1, 10.0), (1, 0.3, 12.0), (2, 0.2, 14.0))]  # fmt: skip
    agg = aggregate(rows)
    assert agg["job"] == "fm-hoc" and agg["seeds"] == 3
    mean, std, n = agg["ac_all"]
    assert (mean, n) == (pytest.approx(0.2), 3) and std == pytest.approx(0.1)  # ddof 1
    assert agg["am_all"] == (pytest.approx(0.5), 0.0, 3)
    table = compare_table([agg], "cmc@1")
    assert "| fm-hoc | hoc | 0.200 ± 0.100 | 0.500 ± 0.000 |" in table and "| 12 |" in table
    one = aggregate(rows[:1])
    assert one["job"] == "fm-hoc-s0" and "| 0.100 |" in compare_table([one], "cmc@1")


def test_time_breakdown_names_each_part_and_the_rest():
    from distcl.pipeline import time_breakdown

    out = {
        "ray_start_s": 4.2, "run_overhead": {"startup_s": 6.0},
        "tasks": {0: {"train_s": 30.0, "end_task_s": 2.0}, 1: {"train_s": 20.0, "end_task_s": 1.5}},
        "eval": {"eval_s": 5.0},
    }  # fmt: skip
    assert time_breakdown(out, 75.0) == (
        "start-up 10s, training (2 tasks) 50s, end-of-task 4s, evaluation 5s, other 6s"
    )  # 75 - 10.2 - 50 - 3.5 - 5 = 6.3
    assert time_breakdown({}, 3.0).endswith("evaluation 0s, other 3s")  # no tasks trained


def test_a_long_sequence_prints_its_row_summary_as_text(capsys):
    """The console summary of a 13-task matrix keeps its brackets: "M[i][i]" and "[all]" are
    text, not the terminal library's style tags (they were printed as "M" and "")."""
    from distcl.eval import compat
    from distcl.eval.report import print_summary

    T = 13
    M = np.tril(np.full((T, T), 0.5)) + np.eye(T) * 0.1
    summary = compat.summarize(M)
    result = {"job": "long", "metric": "cmc@1", "ties": "strict",
              "protocols": {"all": {"metric": "cmc@1", "matrices": {"cmc@1": M.tolist()},
                                    "summary": summary}},
              "stale_gallery": [{"cmc@1": 0.5, "map": 0.4}]}  # fmt: skip
    print_summary(result)
    out = capsys.readouterr().out
    assert "| query model | M[i][i] | row mean (j < i) | row min | M[i][i-1] |" in out
    assert "[all] AC=0.000 AM=" in out and "| φ13 | 0.600 |" in out
    assert "ECC tie rule: strict (M[i][j] > M[j][j])" in out
    result["protocols"]["all"]["matrices"]["cmc@1"] = M[:3, :3].tolist()  # a short one: a table
    result["protocols"]["all"]["summary"] = compat.summarize(M[:3, :3])
    print_summary(result)
    assert "[all] AC=0.000 AM=" in capsys.readouterr().out
