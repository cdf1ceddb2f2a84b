"""FCT's transformation h: its loss against hand-computed values, its numpy export against the
module, its training against a known map, and the engine's "transformed" matrix against a
brute-force transform-then-search."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from distcl.catalog import FCTParams
from distcl.eval import compat
from distcl.eval.evaluate import evaluate_run
from distcl.eval.transforms import Transform, chain, load_transforms
from distcl.losses import fastfill_loss
from distcl.models.transform import Transformation
from distcl.train.transform import fit
from tests.test_eval_engine import make_run


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_fastfill_loss_matches_hand_computed_values():
    out = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    s = torch.tensor([0.0, math.log(4.0)])  # sigma^2 = 1 and 4
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    got = fastfill_loss(out, target, s, logits, labels, disc_weight=1.0, label_smoothing=0.0)
    mse = [0.5, 2.0]  # (1/d)||h - new||^2 per item
    ce = [math.log(1 + math.exp(-2.0)), math.log(2.0)]
    w = [0.5, 0.5 / 4]  # 0.5 exp(-s)
    assert got["mse"].item() == pytest.approx((w[0] * mse[0] + w[1] * mse[1]) / 2)
    assert got["disc"].item() == pytest.approx((w[0] * ce[0] + w[1] * ce[1]) / 2)
    assert got["sigma"].item() == pytest.approx(0.5 * (0 + math.log(4.0)) / 2)
    # label smoothing 0.1 over 2 classes: CE against (0.95, 0.05)
    ls = fastfill_loss(out, target, None, logits, labels, label_smoothing=0.1)
    p0 = torch.log_softmax(logits[0], 0)
    want0 = -(0.95 * p0[0] + 0.05 * p0[1])
    want = (want0 + math.log(2.0)) / 2
    assert ls["disc"].item() == pytest.approx(float(want), rel=1e-6)
    assert set(ls) == {"mse", "disc"} and ls["mse"].item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="log_var must have one value per row"):
        fastfill_loss(out, target, torch.zeros(3))


def test_transformation_is_fct_sized_and_its_numpy_export_is_its_eval_function():
    h = Transformation(128, 128, 2048, sigma=True)
    n_params = sum(p.numel() for p in h.parameters())
    assert n_params == 5_712_000 + 129  # FCT's MLP_BN_SIDE_PROJECTION + FastFill's sigma head
    torch.manual_seed(0)
    h = Transformation(6, 10, 32)
    with torch.no_grad():  # BatchNorm statistics and affine parameters away from the defaults
        for m in h.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    h.eval()
    x = torch.randn(50, 6)
    out, s = h(x)
    t = Transform.from_arrays(h.export())
    np.testing.assert_allclose(t.raw(x.numpy()), out.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(t.log_var(x.numpy()), s.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(t(x.numpy()), _unit(out.detach().numpy()), atol=1e-5)
    assert (t.old_dim, t.new_dim) == (6, 10)
    with pytest.raises(ValueError, match="rows of size 7; this transformation maps rows of size 6"):
        t(np.zeros((2, 7), np.float32))


def test_h_trained_on_rows_related_by_a_known_linear_map_recovers_it():
    """New rows = normalize(A old), A a random 12 x 16 map: h (FCT's recipe, MSE only) learns it
    on 2000 rows; on 500 held-out rows the mean cosine between h's output and the true row is
    above 0.99 (measured: ~0.995 at 150 epochs)."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(12, 16))
    old = _unit(rng.normal(size=(2500, 12))).astype(np.float32)
    new = _unit(old @ A).astype(np.float32)
    p = FCTParams(inner_dim=256, epochs=150, batch_size=256, lr=2e-3, sigma=False,
                  disc_weight=0.0)  # fmt: skip
    x, y = torch.from_numpy(old[:2000]), torch.from_numpy(new[:2000]) * 4.0  # sqrt(16)
    h, history = fit(x, y, torch.zeros(2000, dtype=torch.int64), p, 2000, seed=0)
    assert history[-1]["mse"] < 0.05 * history[0]["mse"]
    got = Transform.from_arrays(h.export())(old[2000:])
    cos = (got * new[2000:]).sum(1)
    assert cos.mean() > 0.99, f"mean cosine {cos.mean():.4f}"


def test_chain_composes_and_names_a_missing_transformation():
    rng = np.random.default_rng(1)
    hs = {}
    for u, (a, b) in {1: (4, 6), 2: (6, 5)}.items():
        torch.manual_seed(u)
        hs[u] = Transform.from_arrays(Transformation(a, b, 8).eval().export())
    x = _unit(rng.normal(size=(7, 4))).astype(np.float32)
    np.testing.assert_allclose(chain(hs, 0, 2)(x), hs[2](hs[1](x)), atol=1e-6)
    with pytest.raises(ValueError, match="model 4 has no transformation"):
        chain(hs, 1, 3)
    with pytest.raises(ValueError, match="maps an older model's rows forward"):
        chain(hs, 2, 1)


def test_engine_transformed_matrix_equals_transform_then_search(synthetic_job):
    """A 3-model run with h_1, h_2 stored: the engine's "transformed" entry (i, j) is the
    closed-set search of model i's queries against model j's rows sent through h_j+1 .. h_i,
    computed here by brute force; its diagonal is the plain one."""
    job = synthetic_job(
        name="fct-eval", method={"name": "fct"}, data={"synthetic_classes": 10},
        scenario={"tasks": 3, "heldout_classes": 3}, eval={"protocols": ["closed"]},
    )  # fmt: skip
    run, scen, ids, labels, tasks, embs = make_run(job)
    for u in (1, 2):
        torch.manual_seed(10 + u)
        h = Transformation(8, 8, 16)
        h(torch.randn(64, 8))  # BatchNorm statistics of a batch
        buf = io.BytesIO()
        np.savez(buf, **h.eval().export())
        (run / "models" / str(u) / "transform.npz").write_bytes(buf.getvalue())
    result = evaluate_run(run, log=lambda *a: None)
    got = result["protocols"]["transformed"]["matrices"]
    closed = tasks >= 0
    hs = load_transforms(run)
    names = ["cmc@1", "cmc@5", "map"]
    plain = compat.compatibility_matrices([e[closed] for e in embs], labels[closed], names)
    for i in range(3):
        for j in range(i + 1):
            g = embs[j][closed] if i == j else chain(hs, j, i)(embs[j][closed])
            ref = compat.compatibility_matrices([g, embs[i][closed]], labels[closed], names)
            for name in names:
                assert got[name][i][j] == pytest.approx(ref[name][1][0], abs=1e-9), (i, j, name)
                if i == j:
                    assert got[name][i][j] == pytest.approx(plain[name][i][i], abs=1e-9)
    assert np.isfinite(result["protocols"]["transformed"]["summary"]["am"])


def test_the_transform_bench_runs_small(tmp_path):
    from distcl.bench.transform import format_transform_bench, run_transform_bench

    r = run_transform_bench(rows=3000, dim=16, inners=(32,), batch_rows=1000,
                            workdir=str(tmp_path))  # fmt: skip
    x = r["inner"][32]
    assert r["read"]["rows"] == x["rows"] == 3000
    assert x["ratio_over_read"] == pytest.approx(x["seconds"] / r["read"]["seconds"])
    assert x["params"] == sum(p.numel() for p in Transformation(16, 16, 32).parameters())
    assert "the read pass (goal <= 1.5)" in format_transform_bench(r)
