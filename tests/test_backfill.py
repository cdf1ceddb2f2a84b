"""Backfilling curves: the pure function against a brute-force reference (every step's gallery
materialised), ties included; each policy's order on hand-made rows.

Run: ``.venv/bin/python -m pytest tests/test_backfill.py -q``
"""

from __future__ import annotations

import numpy as np
import pytest

from distcl.eval import backfill as bf
from distcl.eval import metrics as mt


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force_curve(q_new, g_old, g_new, labels, order, steps, map_k=100):
    """Every step's gallery materialised; leave-one-out CMC@1 by distcl.eval.metrics.cmc
    (pessimistic ties) and mAP@k from the full ranking."""
    n = len(labels)
    values, maps = [], []
    for i in range(steps + 2):
        cut = (i * n) // (steps + 1)
        g = g_old.copy()
        g[order[:cut]] = g_new[order[:cut]]
        values.append(mt.cmc(q_new, labels, g, labels, topk=(1,), exclude_self=True)[1])
        sims = q_new.astype(np.float64) @ g.T.astype(np.float64)
        np.fill_diagonal(sims, -np.inf)
        same = labels[:, None] == labels[None, :]
        np.fill_diagonal(same, False)
        idx = np.lexsort((same, -sims), axis=1)[:, :map_k]  # best first, a miss before a hit
        _, ap, q = mt.topk_counts(np.take_along_axis(sims, idx, 1),
                                  np.take_along_axis(same, idx, 1), same.sum(1), [1],
                                  map_k=min(map_k, n - 1))  # fmt: skip
        maps.append(ap / q)
    return np.array(values), np.array(maps)


@pytest.mark.parametrize("steps", [0, 3, 20])
def test_the_curve_equals_brute_force(steps):
    rng = np.random.default_rng(steps)
    n, d = 150, 8
    labels = rng.integers(0, 6, n)
    centres = rng.normal(size=(6, d))
    g_old = _unit(centres[labels] + 1.3 * rng.normal(size=(n, d)))
    g_new = _unit(centres[labels] + 0.6 * rng.normal(size=(n, d)))
    order = bf.order_random(n, seed=steps)
    got = bf.backfill_curve(g_new, g_old, g_new, labels, order, steps=steps, block=41)
    want, want_map = brute_force_curve(g_new, g_old, g_new, labels, order, steps)
    assert len(got["values"]) == steps + 2
    np.testing.assert_array_equal(got["values"], want)  # exact: counts over the same scores
    np.testing.assert_allclose(got["map@100"], want_map, rtol=1e-12)
    assert got["fractions"] == [i / (steps + 1) for i in range(steps + 2)]
    assert got["auc"] == pytest.approx(np.mean(want))  # the plain mean, not a trapezoid
    assert got["rows_new"][0] == 0 and got["rows_new"][-1] == n


def test_ties_are_pessimistic_at_every_step():
    """Integer-valued rows (every dot product exact): duplicates tie; a tie between a
    positive and a negative is a miss, whichever rows are new at that step."""
    g_old = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [1, 1]], np.float32)
    g_new = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    for order in (np.arange(6), np.array([5, 3, 1, 0, 2, 4])):
        got = bf.backfill_curve(g_new, g_old, g_new, labels, order, steps=4, map_k=5)
        want, want_map = brute_force_curve(g_new, g_old, g_new, labels, order, 4, map_k=5)
        np.testing.assert_array_equal(got["values"], want)
        np.testing.assert_allclose(got["map@5"], want_map, rtol=1e-12)
    # at step 0 (all old): query 2 (new [1, 0]) ties items 0 and 1 (label 0) at 1.0 against
    # its positive 3 at 0.0: a miss; query 4 (new [0, 1]) meets 2, 3 (label 1) at 1.0 and its
    # positive 5 at 1.0: a tie, a miss.
    first = bf.backfill_curve(g_new, g_old, g_new, labels, np.arange(6), steps=0, map_k=None)
    assert first["values"][0] == want[0]


def test_a_transformation_may_stand_for_the_new_rows():
    """g_new need not be the queries' model: FCT's transformed old rows."""
    rng = np.random.default_rng(5)
    n = 60
    labels = rng.integers(0, 3, n)
    q = _unit(rng.normal(size=(n, 4)))
    g_old, h_old = _unit(rng.normal(size=(n, 4))), _unit(rng.normal(size=(n, 4)))
    order = bf.order_random(n, 1)
    got = bf.backfill_curve(q, g_old, h_old, labels, order, steps=5, map_k=None)
    want, _ = brute_force_curve(q, g_old, h_old, labels, order, 5)
    np.testing.assert_array_equal(got["values"], want)
    assert "map@100" not in got


def test_bad_input_names_what_is_wrong():
    x = _unit(np.eye(4))
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="permutation"):
        bf.backfill_curve(x, x, x, labels, np.array([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="dimensions differ"):
        bf.backfill_curve(x, x[:, :3], x, labels, np.arange(4))
    with pytest.raises(ValueError, match="g_old has 3 rows"):
        bf.backfill_curve(x, x[:3], x, labels, np.arange(4))
    with pytest.raises(ValueError, match="--policy: unknown policy 'newest'"):
        bf.check_policies(["random", "newest"])
    with pytest.raises(ValueError, match="uncertainty needs a transformation"):
        bf.check_policies(["uncertainty"], has_sigma=False)
    assert bf.check_policies(["uncertainty"], has_sigma=True) == ["uncertainty"]


# ---------------------------------------------------------------- policies
def test_random_is_a_seeded_permutation():
    a, b = bf.order_random(50, 3), bf.order_random(50, 3)
    assert np.array_equal(a, b) and sorted(a) == list(range(50))
    assert not np.array_equal(a, bf.order_random(50, 4))


def test_oldest_takes_the_oldest_models_rows_then_the_earliest_arrivals():
    models = np.array([2, 0, 1, 0, 2, 1])
    tasks = np.array([2, 0, 1, 0, 0, 1])
    order = bf.order_oldest(models, tasks, seed=0)
    assert models[order].tolist() == [0, 0, 1, 1, 2, 2]
    assert order[4:].tolist() == [4, 0]  # model 2: task 0 arrived before task 2
    assert sorted(order[:2]) == [1, 3] and sorted(order[2:4]) == [2, 5]


def test_distance_takes_the_largest_change_first():
    g_old = np.array([[1, 0], [1, 0], [1, 0]], np.float32)
    g_new = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)  # moved 0, sqrt(2), 2
    assert bf.order_distance(g_old, g_new).tolist() == [2, 1, 0]


def test_class_mean_takes_the_row_farthest_from_its_class_mean_first():
    g_old = np.array([[1, 0], [1, 0.1], [0, 1], [0, 1], [1, 0]], np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    keys = bf.class_mean_keys(g_old, labels)
    # class 0's mean ~ (0.67, 0.37): row 2 (0, 1) is farthest; class 1's mean (0.5, 0.5):
    # rows 3 and 4 are equally far from it
    order = bf.order_class_mean(g_old, labels)
    assert order[0] == 2 and keys[3] == pytest.approx(keys[4])
    assert keys[1] < keys[0] < keys[2]


def test_uncertainty_takes_the_largest_sigma_first():
    sigma = np.array([[0.1, 0.1], [0.9, 0.7], [0.5, 0.5]])
    assert bf.order_uncertainty(sigma).tolist() == [1, 2, 0]
    assert bf.order_uncertainty(np.array([0.2, 0.3, 0.1])).tolist() == [1, 0, 2]


# ---------------------------------------------------------------- on a run's stored rows
@pytest.fixture
def stored_run(synthetic_job):
    """A finished 3-task run (no training): 8 classes, 2 held out, 10 test items each,
    every model's rows written as 2 Parquet parts (two ranks), later models drifting."""
    import json

    from distcl.config import dump_job
    from distcl.data.scenario import build_scenario
    from distcl.gallery.store import write_embeddings

    job = synthetic_job(
        name="bf", data={"synthetic_classes": 8, "synthetic_test_per_class": 10},
        scenario={"tasks": 3, "heldout_classes": 2},
        eval={"protocols": ["closed", "open"], "probes_per_class": 4},
    )  # fmt: skip
    test_labels = np.repeat(np.arange(8), 10)
    scen = build_scenario(np.repeat(np.arange(8), 32), test_labels, job.scenario, job.seed,
                          heldout=2)  # fmt: skip
    run = job.run_dir
    (run / "models").mkdir(parents=True)
    (run / "job.yaml").write_text(dump_job(job))
    (run / "scenario.json").write_text(json.dumps(scen.to_json()))
    items = np.concatenate([scen.eval_items, scen.heldout_items])
    ids = np.array([f"test-{i:07d}" for i in items])
    labels = test_labels[items]
    arrival = {int(i): t.index for t in scen.tasks for i in t.gallery_items}
    tasks = np.array([arrival.get(int(i), -1) for i in items], np.int32)
    rng = np.random.default_rng(0)
    centres, noise = rng.normal(size=(8, 16)), rng.normal(size=(len(ids), 16))
    embs = []
    for t in range(3):
        emb = _unit(centres[labels] + rng.normal(scale=0.5 * t, size=(8, 16))[labels] + noise)
        embs.append(emb)
        half = len(ids) // 2
        for part, rows in (("part-0", slice(0, half)), ("part-1", slice(half, None))):
            write_embeddings(run / "eval" / "embeddings", t, part, ids[rows], labels[rows],
                             tasks[rows], emb[rows])  # fmt: skip
        now = tasks == t  # the stale gallery: items arriving at t, embedded by model t
        write_embeddings(run / "gallery", t, "part-0", ids[now], labels[now], tasks[now],
                         emb[now])  # fmt: skip
        (run / "models" / str(t)).mkdir()
        (run / "models" / str(t) / "done.json").write_text("{}")
    return run, ids, labels, tasks, embs


def _canonical(ids):
    return np.argsort(ids.astype(str), kind="stable")  # the engine sorts by item id


@pytest.mark.parametrize("policy", ["random", "oldest", "distance", "class_mean"])
def test_streamed_curves_equal_the_in_memory_curve(stored_run, policy):
    from distcl.eval.backfill_scan import run_curves

    run, ids, labels, tasks, embs = stored_run
    (curve,) = run_curves(run, pairs="1,3", policies=[policy], steps=6, protocols=["closed"],
                          log=None)  # fmt: skip
    canon = _canonical(ids)
    closed = canon[tasks[canon] >= 0]  # the closed-set items in canonical order
    lab, old, new = labels[closed], embs[0][closed], embs[2][closed]
    order = {
        "random": lambda: bf.order_random(len(closed), 0),
        "oldest": lambda: bf.order_oldest(np.zeros(len(closed)), tasks[closed], 0),
        "distance": lambda: bf._stable_desc(bf.distance_keys(old, new), 0),
        "class_mean": lambda: bf._stable_desc(bf.class_mean_keys(old, lab), 0),
    }[policy]()
    want = bf.backfill_curve(new, old, new, lab, order, steps=6)
    assert curve["values"] == want["values"] and curve["auc"] == want["auc"]
    np.testing.assert_allclose(curve["map@100"], want["map@100"], rtol=1e-12)
    assert (curve["old"], curve["new"], curve["protocol"], curve["policy"]) == (
        0, 2, "closed", policy)  # fmt: skip


def test_shards_merge_to_the_one_pass_curve(stored_run):
    """Each Parquet part its own shard (as Ray tasks get them): the merged accumulators give
    the curve of one pass."""
    import dataclasses

    from distcl.eval import backfill_scan as bs
    from distcl.eval.engine import Engine, EvalSettings
    from distcl.rundir import RunDir

    run, *_ = stored_run
    rd = RunDir(run)
    settings = EvalSettings.from_job(rd.load_job())
    whole = Engine(run, settings, rd.load_scenario())
    split = Engine(run, dataclasses.replace(settings, shard_rows=1), rd.load_scenario())
    assert len(bs._shards(split, 2)) == 2 and len(bs._shards(whole, 2)) == 1
    out = []
    for engine in (whole, split):
        (target,) = bs.targets(engine, ["closed"])
        cuts = bf.step_cuts(int(target.members.sum()), 5)
        buckets = bs.policy_buckets(engine, target, 0, 2, ["random"], cuts, 0)
        queries = engine._query_data(2)["closed"]
        acc = bs._passes(engine, target, 0, 2, queries, buckets, cuts, 100)["random"]
        out.append(acc.result())
    assert out[0] == out[1]


def test_the_open_protocol_backfills_the_held_out_gallery(stored_run):
    from distcl.eval.backfill_scan import run_curves

    run, ids, labels, tasks, embs = stored_run
    curves = run_curves(run, pairs="last", policies=["random"], steps=3, protocols=["open"],
                        log=None)  # fmt: skip
    assert [(c["old"], c["new"]) for c in curves] == [(0, 2), (1, 2)]
    # 2 held-out classes x 10 items: 4 probes each, 6 each in the gallery
    assert curves[0]["items"] == 12 and curves[0]["queries"] == 8


def test_the_command_writes_curves_figure_and_report(stored_run, capsys):
    import pyarrow.parquet as pq

    from distcl.cli import main
    from distcl.eval.evaluate import evaluate_run

    run, *_ = stored_run
    evaluate_run(run, log=lambda *a: None)
    assert main(["backfill", str(run), "--policy", "random", "--policy", "distance",
                 "--steps", "4", "--protocol", "closed"]) == 0  # fmt: skip
    table = pq.read_table(run / "backfill" / "curves.parquet").to_pylist()
    assert len(table) == 2 * 2 * 6  # 2 pairs (last) x 2 policies x 6 points
    assert {r["policy"] for r in table} == {"random", "distance"}
    assert (run / "backfill.png").stat().st_size > 1000
    report = (run / "report.md").read_text()
    assert "## Backfilling" in report and "| closed | 1 -> 3 | old | distance |" in report
    assert "AUC (CMC@1)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "newest"], "unknown policy 'newest'"),
        (["--policy", "uncertainty"], "uncertainty needs a transformation"),
        (["--pairs", "3,1"], "--pairs 3,1: needs 1 <= J < I <= 3"),
        (["--pairs", "first"], "--pairs: 'first' is not last, all or J,I"),
        (["--steps", "-1"], "--steps must be >= 0"),
    ],
)
def test_bad_arguments_fail_before_any_work_naming_the_field(stored_run, capsys, args, message):
    from distcl.cli import main

    run, *_ = stored_run
    assert main(["backfill", str(run), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (run / "backfill").exists()


def test_a_folder_that_is_not_a_run_is_named(tmp_path, capsys):
    from distcl.cli import main

    assert main(["backfill", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_the_bench_runs_small_and_its_curve_starts_at_the_engines_pass(tmp_path):
    """``distcl bench backfill`` at a small size: both measurements run; the curve's first
    point (no row re-embedded) is the engine pass's CMC@1 of the same pair, computed by two
    independent paths (faiss top-k lists / the backfill accumulator)."""
    from distcl.bench.backfill import format_backfill_bench, run_backfill_bench

    r = run_backfill_bench(rows=3000, probes=300, dim=16, workdir=str(tmp_path))
    assert r["curve_equals_pass_at_start"], (r["values"][0], r["pass_cmc@1"])
    assert len(r["values"]) == 22 and r["pass_s"] > 0 and r["curve_s"] > 0
    assert "ratio curve / pass" in format_backfill_bench(r)


def _store_transforms(run, dims=(16, 16, 16), sigma=True):
    """h_1, h_2 (random, BatchNorm statistics of one batch) in the run's model folders."""
    import io

    import torch

    from distcl.models.transform import Transformation

    for u in (1, 2):
        torch.manual_seed(u)
        h = Transformation(dims[u - 1], dims[u], 32, sigma=sigma)
        h(torch.randn(64, dims[u - 1]))
        buf = io.BytesIO()
        np.savez(buf, **h.eval().export())
        (run / "models" / str(u) / "transform.npz").write_bytes(buf.getvalue())


@pytest.mark.parametrize("policy", ["random", "distance", "uncertainty"])
def test_transformed_curves_equal_the_in_memory_curve(stored_run, policy):
    """--transform: the old side is model 1's rows through h_2 and h_3 (FCT), ordered at
    random, by ||new - h(old)|| (FastFill's oracle) or by h_3's sigma (FastFill); the plain
    curves of the same call are unchanged."""
    from distcl.eval.backfill_scan import run_curves
    from distcl.eval.transforms import chain, load_transforms

    run, ids, labels, tasks, embs = stored_run
    _store_transforms(run)
    curves = run_curves(run, pairs="1,3", policies=[policy], steps=5, protocols=["closed"],
                        log=None, transform=True)  # fmt: skip
    by_rows = {c["old_rows"]: c for c in curves}
    assert set(by_rows) == ({"transformed"} if policy == "uncertainty"
                            else {"stored", "transformed"})  # fmt: skip
    canon = _canonical(ids)
    closed = canon[tasks[canon] >= 0]
    hs = load_transforms(run)
    lab, new = labels[closed], embs[2][closed]
    old_t = chain(hs, 0, 2)(embs[0][closed])
    order = {
        "random": lambda: bf.order_random(len(closed), 0),
        "distance": lambda: bf._stable_desc(bf.distance_keys(old_t, new), 0),
        "uncertainty": lambda: bf._stable_desc(hs[2].log_var(hs[1](embs[0][closed])), 0),
    }[policy]()
    want = bf.backfill_curve(new, old_t, new, lab, order, steps=5)
    got = by_rows["transformed"]
    assert got["values"] == want["values"] and got["auc"] == pytest.approx(want["auc"])
    if policy != "uncertainty":
        plain = bf.backfill_curve(new, embs[0][closed], new, lab, order if policy == "random"
                                  else bf._stable_desc(bf.distance_keys(embs[0][closed], new), 0),
                                  steps=5)  # fmt: skip
        assert by_rows["stored"]["values"] == plain["values"]


def test_apply_transform_writes_a_gallery_version_the_evaluation_reads(stored_run, capsys):
    """--apply --transform --model 3: every stored row older than model 3 goes through h into
    model 3's space (no image read), as gallery/model=2/transform-1-<k>.parquet; the stale
    gallery after task 3 then is those rows plus task 3's own, as brute force computes it. A
    re-run after a crash (one part lost, the plan not done) writes only the missing part. A
    later re-embedding by model 3 (policy uncertainty) counts the transformed rows as not yet
    embedded."""
    import json

    from distcl.cli import main
    from distcl.eval.evaluate import evaluate_run
    from distcl.eval.transforms import chain, load_transforms
    from distcl.reindex import choose

    run, ids, labels, tasks, embs = stored_run
    _store_transforms(run)
    assert main(["backfill", str(run), "--apply", "--transform", "--model", "3"]) == 0
    parts = sorted((run / "gallery" / "model=2").glob("transform-1-*.parquet"))
    assert len(parts) == 2  # the two stored parts of models 1 and 2
    plan = json.loads((run / "backfill" / "apply-1.json").read_text())
    assert plan["done"] and plan["rows"] == int(((tasks >= 0) & (tasks < 2)).sum())
    # a crash after one part: the plan open again, one part lost
    plan["done"] = False
    (run / "backfill" / "apply-1.json").write_text(json.dumps(plan))
    kept = parts[0].stat().st_mtime_ns
    parts[1].unlink()
    capsys.readouterr()
    assert main(["backfill", str(run), "--apply", "--transform", "--model", "3"]) == 0
    assert "1 of 2 parts already written" in capsys.readouterr().out
    assert parts[1].exists() and parts[0].stat().st_mtime_ns == kept
    result = evaluate_run(run, log=lambda *a: None)
    hs = load_transforms(run)
    canon = _canonical(ids)
    closed = canon[tasks[canon] >= 0]
    rows = np.stack([embs[2][i] if tasks[i] == 2 else chain(hs, int(tasks[i]), 2)(
        embs[int(tasks[i])][i : i + 1])[0] for i in closed])  # fmt: skip
    sims = embs[2][closed] @ rows.T
    np.fill_diagonal(sims, -np.inf)
    best = sims.argmax(1)
    want = float(np.mean(labels[closed][best] == labels[closed]))
    assert result["stale_gallery"][2]["cmc@1"] == pytest.approx(want)
    assert result["stale_gallery"][2]["models_in_gallery"] == [2]
    # FastFill's next step: re-embed the most uncertain half; transformed rows are not embedded
    plan = choose(run, 2, 0.5, "uncertainty", 0)
    n_old = int(((tasks >= 0) & (tasks < 2)).sum())
    assert plan["first"] == int(0.5 * int((tasks >= 0).sum())) and plan["already"] <= plan["first"]
    sigma = {ids[i]: hs[2].log_var(chain(hs, int(tasks[i]), 1)(embs[int(tasks[i])][i : i + 1])
                                   if tasks[i] < 1 else embs[1][i : i + 1])[0]
             for i in closed if tasks[i] < 2}  # fmt: skip
    top = sorted(sigma, key=lambda k: -sigma[k])[: len(plan["items"])]
    assert sorted(top) == plan["items"] and len(plan["items"]) <= n_old
