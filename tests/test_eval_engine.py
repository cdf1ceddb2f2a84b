"""The streaming evaluation engine (distcl.eval.engine) against brute-force numpy references:
every protocol, exact and top-k paths, streamed blocks under a small memory budget, IVF recall,
the row cache, and the regressions of issue 14 (items_per_class, mid-run top-k mAP, partial
runs).

Run: ``.venv/bin/python -m pytest tests/test_eval_engine.py -q``
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from distcl.config import dump_job
from distcl.data.scenario import build_scenario
from distcl.eval import compat
from distcl.eval import metrics as mt
from distcl.eval import protocols as pr
from distcl.eval.engine import Engine, EvalSettings
from distcl.eval.evaluate import evaluate_run, finished_tasks, score_task
from distcl.gallery.store import write_embeddings

T = 3
ALL = ("closed", "open", "verification", "identification")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_run(job, classes=10, per_class=8, dim=8, heldout=3, seed=0, parts=2):
    """A T-task run dir: models embed items as class centre + model drift + noise; the
    evaluation set (closed items and held-out items, task -1) in ``parts`` parts per model."""
    rng = np.random.default_rng(seed)
    test_labels = np.repeat(np.arange(classes), per_class)
    scen = build_scenario(np.repeat(np.arange(classes), 4), test_labels, job.scenario, job.seed,
                          heldout=heldout)  # fmt: skip
    run = job.run_dir
    (run / "models").mkdir(parents=True)
    (run / "job.yaml").write_text(dump_job(job))
    (run / "scenario.json").write_text(json.dumps(scen.to_json()))
    items = np.sort(np.concatenate([scen.eval_items, scen.heldout_items]))
    ids = np.array([f"test-{i:07d}" for i in items])  # sorted: canonical order = this order
    labels = test_labels[items]
    arrival = {int(i): t.index for t in scen.tasks for i in t.gallery_items}
    tasks = np.array([arrival.get(int(i), -1) for i in items])
    centres = rng.normal(size=(classes, dim))
    noise = rng.normal(size=(len(ids), dim))
    embs = []
    for t in range(T):
        emb = _unit(centres[labels] + rng.normal(scale=0.5 * t, size=(classes, dim))[labels]
                    + 0.7 * noise + 0.05 * rng.normal(size=noise.shape))  # fmt: skip
        embs.append(emb)
        order = rng.permutation(len(ids))  # ranks write in any order
        for r, part in enumerate(np.array_split(order, parts)):
            write_embeddings(run / "eval" / "embeddings", t, f"part-{r}", ids[part],
                             labels[part], tasks[part], emb[part])  # fmt: skip
            here = part[tasks[part] == t]
            write_embeddings(run / "gallery", t, f"part-{r}", ids[here], labels[here],
                             tasks[here], emb[here])  # fmt: skip
        (run / "models" / str(t)).mkdir()
        (run / "models" / str(t) / "done.json").write_text("{}")
    return run, scen, ids, labels, tasks, embs


@pytest.fixture
def openrun(synthetic_job):
    job = synthetic_job(
        name="open", data={"synthetic_classes": 10},
        scenario={"tasks": T, "heldout_classes": 3},
        eval={"protocols": list(ALL), "verification_pairs": 40, "folds": 4,
              "distractor_classes": 1, "fars": [0.05, 0.2]},
    )  # fmt: skip
    return (job, *make_run(job))


def _settings(job, **kw):
    return dataclasses.replace(EvalSettings.from_job(job, use_gpu=False), **kw)


def _reference(s: EvalSettings, scen, labels, tasks, embs):
    """Brute-force numpy matrices of every protocol."""
    ref: dict[str, dict[str, np.ndarray]] = {}
    closed = pr.closed_subset(labels, tasks >= 0, s.items_per_class, s.seed)
    names = [f"cmc@{k}" for k in s.topk] + ["map"]
    seen = [np.isin(labels[closed], scen.tasks[t].seen_classes) for t in range(T)]
    cl = [e[closed] for e in embs]
    ref["all"] = compat.compatibility_matrices(cl, labels[closed], names)
    ref["seen"] = compat.compatibility_matrices(cl, labels[closed], names, seen_masks=seen)
    split = pr.open_split(labels, tasks < 0, s.probes_per_class, s.distractor_classes, s.seed)
    a, b, same = pr.verification_pairs(labels, tasks < 0, s.verification_pairs, s.seed)
    P, G = split.probes, split.gallery
    for name in ("open", "identification", "verification"):
        ref[name] = {}
    for i in range(T):
        for j in range(i + 1):
            r = mt.retrieval_summary(embs[i][P], labels[P], embs[j][G], labels[G],
                                     topk=s.topk, recall_ks=s.recall_ks)  # fmt: skip
            for k in r:
                ref["open"].setdefault(k, np.full((T, T), np.nan))[i, j] = r[k]
            ident = mt.template_identification(embs[i][P], labels[P], embs[j][G], labels[G], s.topk)
            for k, v in ident.items():
                ref["identification"].setdefault(f"ident_cmc@{k}", np.full((T, T), np.nan))[
                    i, j
                ] = v
            scores = (embs[i][a].astype(np.float64) * embs[j][b]).sum(1)
            v = {"verif_acc": mt.verification_accuracy(scores, same, s.folds)}
            v |= {pr.far_name(f): x for f, x in mt.tar_at_far(scores, same, s.fars).items()}
            for k, x in v.items():
                ref["verification"].setdefault(k, np.full((T, T), np.nan))[i, j] = x
    return ref


def _check(result, ref, names_by_proto):
    for proto, names in names_by_proto.items():
        for name in names:
            got = np.asarray(result["protocols"][proto]["matrices"][name], dtype=float)
            np.testing.assert_allclose(got, ref[proto][name], atol=1e-9, equal_nan=True,
                                       err_msg=f"{proto} {name}")  # fmt: skip


def test_every_protocol_equals_brute_force_exact_path(openrun):
    job, run, scen, ids, labels, tasks, embs = openrun
    s = _settings(job)
    result = evaluate_run(run, log=lambda *a: None, settings=s)
    assert set(result["protocols"]) == {"all", "seen", "open", "verification", "identification"}
    assert result["protocols"]["all"]["map_kind"] == "exact"
    ref = _reference(s, scen, labels, tasks, embs)
    _check(result, ref, {
        "all": ["cmc@1", "cmc@5", "map"], "seen": ["cmc@1", "map"],
        "open": ["cmc@1", "cmc@5", "recall@10", "map"],
        "identification": ["ident_cmc@1", "ident_cmc@5"],
        "verification": ["verif_acc", "tar@far=5e-2", "tar@far=2e-1"],
    })  # fmt: skip
    s_all = result["protocols"]["all"]["summary"]
    assert s_all["ac"] == pytest.approx(compat.average_compatibility(ref["all"]["cmc@1"]))
    ver = result["protocols"]["verification"]
    assert ver["metric"] == "verif_acc" and ver["summary"]["ties"] == "strict"
    report = (run / "report.md").read_text()
    assert "ECC tie rule: `strict`" in report and "identification" in report
    assert result["items"]["distractor_classes"] and result["items"]["verification_pairs"] == 80


def test_topk_path_and_streamed_blocks_equal_brute_force(openrun, monkeypatch):
    """Top-k lists (exact_map off) in blocks of 5 rows: CMC/Recall exact; mAP@100 is the exact
    mAP here because every gallery has < 100 rows."""
    from distcl.gallery import search

    job, run, scen, ids, labels, tasks, embs = openrun
    blocks = []
    real_add = search.StreamSearch.add

    def add(self, emb, lab):
        blocks.append(len(emb))
        real_add(self, emb, lab)

    monkeypatch.setattr(search.StreamSearch, "add", add)
    s = _settings(job, exact_map=False, block_rows=5, ties="ties_pass")
    result = evaluate_run(run, log=lambda *a: None, settings=s)
    assert max(blocks) <= 5 and len(blocks) > 3 * T
    assert result["protocols"]["open"]["map_kind"] == "map@100"
    assert result["stale_gallery"][0]["map_kind"] == "map@100"
    ref = _reference(s, scen, labels, tasks, embs)
    _check(result, ref, {
        "all": ["cmc@1", "cmc@5", "map"], "seen": ["cmc@1", "cmc@5", "map"],
        "open": ["cmc@1", "recall@10", "map"],
    })  # fmt: skip
    assert result["protocols"]["all"]["summary"]["ties"] == "pass"
    assert "ECC tie rule: `ties_pass`" in (run / "report.md").read_text()


def test_memory_stays_bounded_when_the_gallery_exceeds_the_budget(synthetic_job):
    """A 1 MiB budget and a ~9.4 MiB gallery per model (97 probes): the gallery is streamed in
    blocks of <= 1024 rows and numpy's peak stays far below one model's gallery; results
    equal brute force."""
    import tracemalloc

    job = synthetic_job(name="big", data={"synthetic_classes": 600},
                        scenario={"tasks": 1, "heldout_classes": 597},
                        eval={"protocols": ["open"], "exact_map": False, "memory_budget_mb": 1,
                              "probes_per_class": 1, "distractor_classes": 500})  # fmt: skip
    global T
    old_t, T = T, 1
    try:
        run, scen, ids, labels, tasks, embs = make_run(job, classes=600, per_class=32, dim=128,
                                                       heldout=597)  # fmt: skip
    finally:
        T = old_t
    s = _settings(job)
    engine = Engine(run, s, scen)
    gallery_bytes = int(engine.plan.split.gallery.sum()) * 128 * 4
    assert gallery_bytes > 8 * s.budget
    tracemalloc.start()
    rows = engine.rows([0], stale=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # blocks and batches are bounded by the budget; what remains is O(N) bookkeeping (ids,
    # labels, masks), never O(N d)
    assert peak < gallery_bytes / 3, (peak, gallery_bytes)
    P, G = engine.plan.split.probes, engine.plan.split.gallery
    ref = mt.retrieval_summary(embs[0][P], labels[P], embs[0][G], labels[G], topk=(1, 5))
    got = rows[0]["protocols"]["open"]["values"]
    assert got["cmc@1"] == [pytest.approx(ref["cmc@1"])]
    assert got["cmc@5"] == [pytest.approx(ref["cmc@5"])]


@pytest.mark.parametrize("index", ["ivf", "ivfpq"])
def test_ann_indexes_report_their_recall(openrun, index):
    job, run, scen, *_ = openrun
    s = _settings(job, protocols=("open",), exact_map=False, index=index)
    rows = Engine(run, s, scen).rows([1], stale=False)
    vals = rows[1]["protocols"]["open"]["values"]
    assert len(vals["ann_recall@10"]) == 2 and all(0 <= r <= 1 for r in vals["ann_recall@10"])
    assert all(0 <= v <= 1 for v in vals["cmc@1"])


@pytest.mark.skipif(
    not __import__("distcl.gallery.index", fromlist=["x"]).gpu_available(), reason="no GPU"
)
def test_gpu_search_equals_cpu(openrun):
    job, run, scen, *_ = openrun
    cpu = Engine(run, _settings(job, exact_map=False, use_gpu=False), scen).rows([2])
    gpu = Engine(run, _settings(job, exact_map=False, use_gpu=True), scen).rows([2])
    for proto in ("all", "seen", "open"):
        for k in ("cmc@1", "recall@10"):
            np.testing.assert_allclose(gpu[2]["protocols"][proto]["values"][k],
                                       cpu[2]["protocols"][proto]["values"][k])  # fmt: skip


def test_eval_use_gpu_is_resolved_where_the_search_runs(openrun, monkeypatch):
    from distcl.gallery import index

    job, run, scen, *_ = openrun
    for value, want in (("auto", "auto"), ("yes", True), ("no", False)):
        got = EvalSettings.from_job(job.model_copy(update={"eval": job.eval.model_copy(
            update={"use_gpu": value})})).use_gpu  # fmt: skip
        assert got == want and type(got) is type(want), value
    monkeypatch.setattr(index, "gpu_available", lambda: False)
    assert Engine(run, _settings(job, use_gpu="auto"), scen).on_gpu is False
    with pytest.raises(ValueError, match="eval.use_gpu is yes, but faiss sees no GPU"):
        Engine(run, _settings(job, use_gpu=True), scen)
    monkeypatch.setattr(index, "gpu_available", lambda: True)  # a GPU worker: auto takes it
    assert Engine(run, _settings(job, use_gpu="auto"), scen).on_gpu is True
    assert Engine(run, _settings(job, use_gpu=False), scen).on_gpu is False


def test_rows_are_cached_and_recomputed_when_inputs_change(openrun, monkeypatch):
    job, run, scen, ids, labels, tasks, embs = openrun
    s = _settings(job)
    row0 = score_task(run, job, scen, 0, settings=s)
    assert (run / "eval" / "rows" / "0.json").is_file()
    assert len(row0["protocols"]["all"]["values"]["cmc@1"]) == 1
    calls = []
    real = Engine.rows

    def rows(self, ts, **kw):
        calls.append(ts)
        return real(self, ts, **kw)

    monkeypatch.setattr(Engine, "rows", rows)
    evaluate_run(run, log=lambda *a: None, settings=s)
    assert calls == [[1, 2]]  # row 0 came from the cache
    evaluate_run(run, log=lambda *a: None, settings=s)
    assert calls == [[1, 2]]  # everything cached
    part = run / "eval" / "embeddings" / "model=1" / "part-0.parquet"
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    evaluate_run(run, log=lambda *a: None, settings=s)
    assert calls[-1] == [1, 2]  # rows >= 1 depend on model 1's parts; row 0 does not
    evaluate_run(run, log=lambda *a: None, settings=dataclasses.replace(s, folds=2))
    assert calls[-1] == [0, 1, 2]


def test_partly_finished_run_scores_the_finished_tasks(openrun):
    job, run, scen, *_ = openrun
    (run / "models" / "2" / "done.json").unlink()
    assert finished_tasks(run) == 2
    result = evaluate_run(run, log=lambda *a: None, settings=_settings(job))
    assert result["tasks"] == 2 and len(result["stale_gallery"]) == 2
    assert np.asarray(result["protocols"]["all"]["matrices"]["cmc@1"]).shape == (2, 2)


def test_items_per_class_below_gallery_per_class(synthetic_job):
    """Regression: the stale gallery holds every arrived item, the queries only the subset
    (KeyError before); the stale entry equals brute force over the ids present."""
    job = synthetic_job(name="ipc", data={"synthetic_classes": 6}, scenario={"tasks": T},
                        eval={"items_per_class": 3})  # fmt: skip
    run, scen, ids, labels, tasks, embs = make_run(job, classes=6, heldout=0)
    s = _settings(job)
    result = evaluate_run(run, log=lambda *a: None, settings=s)
    keep = pr.closed_subset(labels, tasks >= 0, 3, job.seed)
    for st in range(T):
        row = result["stale_gallery"][st]
        g = (tasks >= 0) & (tasks <= st)
        g_emb = np.concatenate([embs[t][tasks == t] for t in range(st + 1)])
        g_lab = np.concatenate([labels[tasks == t] for t in range(st + 1)])
        g_ids = np.concatenate([ids[tasks == t] for t in range(st + 1)])
        q = keep & g
        # brute force with self exclusion by id
        sims = embs[st][q] @ g_emb.T
        same = labels[q][:, None] == g_lab[None, :]
        own = ids[q][:, None] == g_ids[None, :]
        sims[own], same[own] = -np.inf, False
        hits, ap, n = mt.block_counts(sims, same, np.array([1]), True)
        assert row["gallery"] == int(g.sum()) and row["queries"] == int(q.sum())
        assert row["cmc@1"] == pytest.approx(hits[0] / n) and row["map"] == pytest.approx(ap / n)
    assert result["eval_items"] == 6 * 3


def test_report_accepts_mixed_map_keys_of_an_old_metrics_file(openrun, tmp_path):
    """Regression: an older metrics.json whose stale rows switched from `map` to `map@10`
    mid-run (KeyError in the report before)."""
    from distcl.eval.report import write_report

    job, run, *_ = openrun
    result = evaluate_run(run, log=lambda *a: None, settings=_settings(job))
    result["stale_gallery"][1] = {k.replace("map", "map@10") if k == "map" else k: v
                                  for k, v in result["stale_gallery"][1].items()}  # fmt: skip
    text = write_report(run, result)
    assert "map@10" in text and "| mean |" in text


def test_open_protocol_needs_heldout_classes(synthetic_job):
    job = synthetic_job(name="noheld", data={"synthetic_classes": 6}, scenario={"tasks": T},
                        eval={"protocols": ["open"]})  # fmt: skip
    run, scen, *_ = make_run(job, classes=6, heldout=0)
    with pytest.raises(ValueError, match="scenario.heldout_classes"):
        evaluate_run(run, log=lambda *a: None, settings=_settings(job))


def test_verification_without_heldout_uses_the_closed_items(synthetic_job):
    job = synthetic_job(name="vclosed", data={"synthetic_classes": 6}, scenario={"tasks": T},
                        eval={"protocols": ["closed", "verification"], "verification_pairs": 30,
                              "folds": 3})  # fmt: skip
    run, scen, ids, labels, tasks, embs = make_run(job, classes=6, heldout=0)
    s = _settings(job)
    result = evaluate_run(run, log=lambda *a: None, settings=s)
    a, b, same = pr.verification_pairs(labels, tasks >= 0, 30, job.seed)
    scores = (embs[2][a].astype(np.float64) * embs[0][b]).sum(1)
    got = result["protocols"]["verification"]["matrices"]["verif_acc"][2][0]
    assert got == pytest.approx(mt.verification_accuracy(scores, same, 3))


@pytest.mark.parametrize("metric", ["cmc@3", "map@4"])
def test_matrix_metric_outside_topk_is_computed(synthetic_job, metric):
    job = synthetic_job(name="m", data={"synthetic_classes": 6}, scenario={"tasks": T},
                        eval={"metric": metric})  # fmt: skip
    run, scen, ids, labels, tasks, embs = make_run(job, classes=6, heldout=0)
    for exact in (True, False):
        result = evaluate_run(run, log=lambda *a: None,
                              settings=_settings(job, exact_map=exact))  # fmt: skip
        M = np.asarray(result["protocols"]["all"]["matrices"][metric], dtype=float)
        assert result["protocols"]["all"]["metric"] == metric
        q, g = embs[2], embs[0]  # M[2][0]
        sims = q @ g.T
        np.fill_diagonal(sims, -np.inf)
        same = labels[:, None] == labels[None, :]
        np.fill_diagonal(same, False)
        k = int(metric.split("@")[1])
        if metric.startswith("cmc"):
            hits, _, n = mt.block_counts(sims, same, np.array([k]), False)
            assert M[2, 0] == pytest.approx(hits[0] / n)
        else:
            order = np.argsort(-sims, axis=1)[:, :k]
            rel = np.take_along_axis(same, order, 1)
            prec = np.cumsum(rel, 1) / np.arange(1, k + 1)
            ap = (prec * rel).sum(1) / np.minimum(same.sum(1), k)
            assert M[2, 0] == pytest.approx(ap[same.sum(1) > 0].mean())


def test_every_group_of_query_models_gets_every_protocol(openrun):
    """Regression: when the query models of a gallery model come in several groups (a small
    budget), each group gets template identification too (only the first group did)."""
    from distcl.eval.engine import apply_cell

    job, run, scen, *_ = openrun
    engine = Engine(run, _settings(job, exact_map=False), scen)
    rows, cells = engine.cells(list(range(T)), stale=False)
    for cell in cells:
        for i in cell.queries:  # groups of one query model each
            one = dataclasses.replace(cell, queries=(i,))
            apply_cell(rows, engine.finish(one, [engine.scan(one, p) for p in engine.shards(one)]))
    assert rows == engine.rows(list(range(T)), stale=False)
    assert len(rows[T - 1]["protocols"]["identification"]["values"]["ident_cmc@1"]) == T


@pytest.fixture
def bigger_run(synthetic_job):
    """400 evaluation items (280 closed): the IVF search has 7 lists, so nprobe matters."""
    job = synthetic_job(
        name="probe", data={"synthetic_classes": 10}, scenario={"tasks": T, "heldout_classes": 3},
        eval={"protocols": ["closed", "open"], "index": "ivf", "nprobe": 1, "exact_map": False},
    )  # fmt: skip
    return (job, *make_run(job, per_class=40))


def test_eval_nprobe_trades_search_time_for_recall(bigger_run):
    job, run, scen, *_ = bigger_run
    one = EvalSettings.from_job(job, use_gpu=False)
    assert one.nprobe == 1 and one.index == "ivf"
    every = dataclasses.replace(one, nprobe=4096)  # every list probed: exhaustive search
    assert one.key() != every.key()  # an IVF row's cache depends on nprobe, a flat one not
    flat = dataclasses.replace(one, index="flat")
    assert flat.key() == dataclasses.replace(flat, nprobe=4096).key()

    def recalls(rows):
        return [r for p in rows[2]["protocols"].values() for k, v in p["values"].items()
                if k.startswith("ann_recall") for r in v]  # fmt: skip

    low = Engine(run, one, scen).rows([2], stale=False)
    high = Engine(run, every, scen).rows([2], stale=False)
    assert min(recalls(low)) < 1.0 and recalls(high) == [1.0] * len(recalls(high))
    exact = Engine(run, flat, scen).rows([2], stale=False)
    for proto in ("all", "seen", "open"):
        got = {k: v for k, v in high[2]["protocols"][proto]["values"].items()
               if not k.startswith("ann_recall")}  # fmt: skip
        want = exact[2]["protocols"][proto]["values"]
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=f"{proto} {k}")


def test_ivf_training_sample_is_seeded_uniform_and_independent_of_batch_size(
    bigger_run, monkeypatch
):
    """One pass keeps the rows of the smallest seeded keys: pruned (a bound of 30 rows) or not,
    in batches of 7 rows or whole, the sample is the same rows in catalogue order."""
    job, run, scen, ids, labels, tasks, embs = bigger_run
    engine = Engine(run, EvalSettings.from_job(job, use_gpu=False), scen)
    cell = engine.cells([1])[1][0]
    store, models, filt, _ = engine._source(cell)
    target = next(t for t in engine._targets(cell) if t.name == "closed")
    members = np.flatnonzero(target.member)
    whole, n_whole = engine._train_sample(store, models, filt, target, cell)
    assert n_whole == len(members) and len(whole) == len(members)  # small: every row
    np.testing.assert_array_equal(whole, embs[cell.model][members])

    monkeypatch.setattr(Engine, "_sample_size", lambda self, n: min(n, 30))
    keys = np.random.default_rng([engine.s.seed, 21]).random(len(engine.cat))
    want = np.sort(members[np.argsort(keys[members], kind="stable")[:30]])
    for batch in (7, 100_000):
        monkeypatch.setattr(Engine, "_batch_rows", property(lambda self, b=batch: b))
        sample, n = engine._train_sample(store, models, filt, target, cell)
        assert n == len(members)
        np.testing.assert_array_equal(sample, embs[cell.model][want])


@pytest.mark.parametrize("shard_rows", [None, 7])
def test_openset_matrix_equals_brute_force_with_distractors(synthetic_job, tmp_path, shard_rows):
    """eval.protocols [openset]: held-out classes split into enrolled (mated probes + gallery)
    and non-mated (probes only); 30 distractor rows per model from another store. Every
    (i, j) entry equals metrics.open_set_identification on probes by model i against model
    j's gallery and distractors, whether the gallery is one shard or many."""
    job = synthetic_job(
        name="openset", data={"synthetic_classes": 10},
        scenario={"tasks": T, "heldout_classes": 4},
        eval={"protocols": ["openset"], "probes_per_class": 3, "fpirs": [0.1, 0.5, 1.0],
              "distractors": str(tmp_path / "distractors")},
    )  # fmt: skip
    run, scen, ids, labels, tasks, embs = make_run(job, per_class=8, heldout=4)
    rng = np.random.default_rng(5)
    dist = []
    for t in range(T):
        d = _unit(rng.normal(size=(30, 8)))
        dist.append(d)
        write_embeddings(tmp_path / "distractors", t, "part-0",
                         [f"distractor-{k:03d}" for k in range(30)], np.full(30, 99),
                         np.full(30, -1), d)  # fmt: skip
    s = _settings(job, shard_rows=shard_rows)
    engine = Engine(run, s, scen)
    plan = engine.plan.openset
    assert plan.mated.any() and (plan.probes & ~plan.mated).any()
    assert len(plan.nonmated_classes) == 2
    rows = engine.rows(list(range(T)), stale=False)
    P, G = plan.probes, plan.gallery
    for i in range(T):
        got = rows[i]["protocols"]["openset"]["values"]
        for j in range(i + 1):
            g = np.concatenate([embs[j][G], dist[j]])
            g_lab = np.concatenate([labels[G], np.full(30, -1)])
            want = mt.open_set_identification(embs[i][P], labels[P], g, g_lab, fpir=(0.1, 0.5, 1.0))
            for f, v in want.items():
                name = mt.fpir_name(f)
                assert (np.isnan(v) and np.isnan(got[name][j])) or got[name][j] == pytest.approx(v)
    assert rows[0]["items"]["openset_nonmated_probes"] == int((P & ~plan.mated).sum())
    # the whole run: assembled matrices with their summaries
    result = evaluate_run(run, log=lambda *a: None)
    block = result["protocols"]["openset"]
    assert block["metric"] == "tpir@fpir=1e-1" and "rank1" in block["matrices"]


def test_eval_set_reevaluates_a_finished_run_with_other_eval_settings(openrun, capsys):
    """``distcl eval RUN --set eval.protocols=[openset]``: the stored embeddings scored with
    the new protocol, the setting kept in job.yaml; a training field is refused."""
    from distcl.cli import main
    from distcl.config import load_job

    job, run, *_ = openrun
    assert main(["eval", str(run), "--set", "eval.protocols=[closed,openset]"]) == 0
    result = json.loads((run / "metrics.json").read_text())
    assert set(result["protocols"]) == {"all", "seen", "openset"}
    assert load_job(run / "job.yaml").eval.protocols == ("closed", "openset")
    capsys.readouterr()
    assert main(["eval", str(run), "--set", "train.epochs=3"]) == 2
    assert "changes eval.* settings only" in capsys.readouterr().err
