"""Tests of distcl.losses: golden hand-computed values, zero-at-identity, loop references,
gradients, bad input.

Run: ``.venv/bin/python -m pytest tests/test_losses.py -q``
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import distcl.losses as L


def unit(deg: float) -> list[float]:
    """Unit vector in R^2 at ``deg`` degrees."""
    rad = math.radians(deg)
    return [math.cos(rad), math.sin(rad)]


# ---------------------------------------------------------------- golden values


def test_cross_entropy_golden():
    # logits [0, 0] -> p = [1/2, 1/2] -> CE = ln 2; logits [ln 3, 0] label 1 -> p1 = 1/4.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    loss = L.cross_entropy(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-6)


def test_norm_softmax_golden_and_scale_invariant():
    # cos logits [1, 0] / T=0.5 -> [2, 0]; CE(label 0) = ln(1 + e^-2) = 0.126928...
    weight = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # row norms do not matter
    loss = L.norm_softmax_loss(torch.tensor([[2.0, 0.0]]), weight, torch.tensor([0]), 0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)


def test_kd_golden_two_classes():
    # T=2: p_old = softmax([2, 0] / 2) = [e/(e+1), 1/(e+1)], p_new = softmax([0, 0]) = [.5, .5]
    # KL = sum p_old ln(p_old / .5) = 0.110944...; times T^2 = 4 -> 0.443776...
    loss = L.kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), temperature=2.0)
    assert loss.item() == pytest.approx(0.4437762866869094, abs=1e-6)


def test_kd_batchmean_divides_by_batch_only():
    # second row is identical (KL 0): mean over the 2 rows halves the golden value.
    new = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    old = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    assert L.kd_loss(new, old).item() == pytest.approx(0.4437762866869094 / 2, abs=1e-6)


def test_triplet_distillation_picks_hardest_negative():
    # labels 0, 1, 2, 0. Anchor 0 = new(0 deg), positive old_0 at 120 deg: d_ap = 2 - 2cos120 = 3.
    # Negatives of anchor 0: old_1 (90 deg, d = 2) and old_2 (180 deg, d = 4); old_3 (10 deg) has
    # the same label and must be skipped. Hardest = 2 -> relu(3 - 2 + 0.1) = 1.1. (Farthest
    # negative would give 0, using old_3 would give 3.07.) Anchors 1-3 have new == old
    # (d_ap = 0) and nearest negatives >= 0.268 away, so relu(0 - d_an + 0.1) = 0.
    # Mean over 4 anchors = 1.1 / 4.
    old = torch.tensor([unit(120), unit(90), unit(180), unit(10)])
    new = torch.tensor([unit(0), unit(90), unit(180), unit(10)])
    labels = torch.tensor([0, 1, 2, 0])
    loss = L.triplet_distillation_loss(new, old, labels, margin=0.1)
    assert loss.item() == pytest.approx(1.1 / 4, abs=1e-5)


def test_triplet_distillation_normalises_inputs():
    old = torch.tensor([unit(120), unit(90), unit(180), unit(10)])
    new = torch.tensor([unit(0), unit(90), unit(180), unit(10)])
    labels = torch.tensor([0, 1, 2, 0])
    scaled = L.triplet_distillation_loss(3.0 * new, 0.5 * old, labels, margin=0.1)
    assert scaled.item() == pytest.approx(1.1 / 4, abs=1e-5)


def test_triplet_distillation_zero_without_negatives():
    new = torch.randn(4, 3, requires_grad=True)
    loss = L.triplet_distillation_loss(new, torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()  # still attached to the graph
    assert torch.equal(new.grad, torch.zeros_like(new))


def test_coherence_golden_dict_and_tuple():
    # sample 0 (class 0): ||(1,0) - (.5,0)||^2 = .25; sample 2 (class 2): ||(1,1) - 0||^2 = 2;
    # sample 1 (class 1) has no stored mean -> mean over 2 samples = 1.125.
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    means = {0: torch.tensor([0.5, 0.0]), 2: torch.tensor([0.0, 0.0])}
    assert L.coherence_loss(new, labels, means).item() == pytest.approx(1.125)
    as_tuple = (torch.tensor([[0.0, 0.0], [0.5, 0.0]]), torch.tensor([2, 0]))
    assert L.coherence_loss(new, labels, as_tuple).item() == pytest.approx(1.125)


def test_coherence_zero_without_means():
    new = torch.randn(3, 2, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    assert L.coherence_loss(new, labels, {}).item() == 0.0
    assert L.coherence_loss(new, labels, {7: torch.zeros(2)}).item() == 0.0


def test_cosine_distillation_golden():
    # 1 - cos 90deg = 1; 1 - cos 45deg = 1 - 1/sqrt 2 -> mean 0.646446...
    new = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    old = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert L.cosine_distillation_loss(new, old).item() == pytest.approx(0.6464466094, abs=1e-6)
    assert L.projection_loss(new, old).item() == pytest.approx(0.6464466094, abs=1e-6)


def test_l2_feature_golden():
    # ||(1,2) - (0,0)||^2 = 5, ||(3,3) - (3,4)||^2 = 1 -> mean 3
    new = torch.tensor([[1.0, 2.0], [3.0, 3.0]])
    old = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert L.l2_feature_loss(new, old).item() == pytest.approx(3.0)


def test_layerwise_golden_and_weights():
    # stage 0: ones vs zeros -> mse 1; stage 1: twos vs zeros -> mse 4.
    new = [torch.ones(2, 3), torch.full((2, 2, 2, 2), 2.0)]
    old = [torch.zeros(2, 3), torch.zeros(2, 2, 2, 2)]
    assert L.layerwise_alignment_loss(new, old).item() == pytest.approx(2.5)
    # weighted mean: (1 * 1 + 3 * 4) / 4 = 3.25
    assert L.layerwise_alignment_loss(new, old, weights=[1, 3]).item() == pytest.approx(3.25)


def test_batch_hard_triplet_golden():
    # 1-D points 0, 1, 5 (class 0) and 3, 7 (class 1), margin .5, euclidean distances.
    # anchor 0: hardest pos 5, hardest neg 3 -> 2.5;  anchor 1: pos 4, neg 2 -> 2.5
    # anchor 5: pos 5, neg 2 -> 3.5; anchor 3: pos 4, neg 2 -> 2.5; anchor 7: pos 4, neg 2 -> 2.5
    # mean = 13.5 / 5 = 2.7 (the easiest positive would give 0 for anchor 0).
    emb = torch.tensor([[0.0], [1.0], [5.0], [3.0], [7.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert L.batch_hard_triplet_loss(emb, labels, margin=0.5).item() == pytest.approx(2.7, abs=1e-5)


def test_batch_hard_triplet_skips_anchors_without_positive():
    # Points 0, 1 (class 0) and 4 (class 1, no positive: skipped), margin 3.
    # anchor 0: pos 1, neg 4 -> relu(1 - 4 + 3) = 0; anchor 1: pos 1, neg 3 -> 1. Mean 0.5
    # (counting the skipped anchor with d_ap = 0 would give 1/3 or more).
    emb = torch.tensor([[0.0], [1.0], [4.0]])
    labels = torch.tensor([0, 0, 1])
    assert L.batch_hard_triplet_loss(emb, labels, margin=3.0).item() == pytest.approx(0.5, abs=1e-5)
    single = L.batch_hard_triplet_loss(emb, torch.tensor([0, 1, 2]))
    assert single.item() == 0.0


def test_mmd_golden_1d():
    # X = {0, 1}, Y = {2, 3}, sigma 1: k(d^2) = exp(-d^2 / 2)
    # mean kXX = mean kYY = (1 + e^-.5) / 2; mean kXY = (2 e^-2 + e^-4.5 + e^-.5) / 4
    # MMD^2 = (1 + e^-.5) - (2 e^-2 + e^-4.5 + e^-.5) / 2 = 1.162375548...
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[2.0], [3.0]])
    assert L.mmd(x, y, sigmas=(1.0,)).item() == pytest.approx(1.1623755483505829, abs=1e-6)
    # two bandwidths (1, 2): kernels summed -> 1.834767106...
    assert L.mmd(x, y, sigmas=(1.0, 2.0)).item() == pytest.approx(1.8347671062510724, abs=1e-6)


def test_adversarial_golden():
    # new logit ln 3 -> sigmoid .75; old logit 0 -> .5
    # generator: -ln .75; discriminator: (-ln .5 - ln(1 - .75)) / 2
    g = L.generator_loss(torch.tensor([math.log(3.0)]))
    d = L.discriminator_loss(torch.tensor([math.log(3.0)]), torch.tensor([[0.0]]))
    assert g.item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert d.item() == pytest.approx(0.5 * (math.log(2.0) + math.log(4.0)), abs=1e-6)


def test_grad_reverse():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = L.grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (3.0 * y).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-1.5, -1.5]))


def test_grad_reverse_trains_discriminator_and_confuses_new():
    # One term via gradient reversal: the discriminator descends d_loss, the features ascend it.
    torch.manual_seed(0)
    new_feat = torch.randn(8, 4, requires_grad=True)
    old_feat = torch.randn(8, 4)
    disc = torch.nn.Linear(4, 1)
    d_plain = L.discriminator_loss(disc(new_feat), disc(old_feat))
    g_feat_plain = torch.autograd.grad(d_plain, new_feat)[0]
    d_rev = L.discriminator_loss(disc(L.grad_reverse(new_feat)), disc(old_feat))
    g_feat_rev, g_w_rev = torch.autograd.grad(d_rev, (new_feat, disc.weight))
    assert torch.allclose(g_feat_rev, -g_feat_plain)
    d_again = L.discriminator_loss(disc(new_feat.detach()), disc(old_feat))
    assert torch.allclose(g_w_rev, torch.autograd.grad(d_again, disc.weight)[0])


# ---------------------------------------------------------------- zero when new == old


def test_hoc_infonce_golden():
    """Hand computation, mu = 2, labels (5, 5, 7): S = 2 * old @ new.T = [[2, 0, 2],
    [2, 0, 2], [0, 2, 0]]; same-class entries (the diagonal included) become 0, not -inf:
    every row's log-sum-exp is log(1 + 1 + e^2); positives -S[i, i] = (-2, 0, 0).
    L = log(2 + e^2) - 2/3."""
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([5, 5, 7])
    got = L.hoc_infonce_loss(new, old, labels, mu=2.0)
    assert got.item() == pytest.approx(math.log(2 + math.e**2) - 2 / 3, rel=1e-6)
    # Features are L2-normalised inside: scaling either side changes nothing.
    again = L.hoc_infonce_loss(3 * new, 0.5 * old, labels, mu=2.0)
    assert again.item() == pytest.approx(got.item(), rel=1e-6)
    got.backward()
    assert new.grad is not None and torch.isfinite(new.grad).all()


def test_hoc_infonce_matches_a_loop_reference():
    """An independent loop over rows, as iamcl2r's methods/hoc.py reads (mu = 10)."""
    torch.manual_seed(3)
    new, old = torch.randn(9, 6), torch.randn(9, 6)
    labels = torch.randint(0, 3, (9,))
    n = [v / v.norm() for v in new]
    o = [v / v.norm() for v in old]
    rows = []
    for i in range(9):
        s = [10.0 * float(o[i] @ n[j]) for j in range(9)]
        masked = [0.0 if labels[i] == labels[j] else s[j] for j in range(9)]
        rows.append(-s[i] + math.log(sum(math.exp(v) for v in masked)))
    got = L.hoc_infonce_loss(new, old, labels).item()
    assert got == pytest.approx(sum(rows) / 9, rel=1e-5)


def test_hoc_infonce_trains_the_new_side_only_and_sees_the_global_batch():
    torch.manual_seed(4)
    new = torch.randn(8, 4, requires_grad=True)
    old = torch.randn(8, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    L.hoc_infonce_loss(new, old, labels).backward()
    assert old.grad is None and new.grad.abs().sum() > 0  # the old model is a target
    # Rank r holds half the batch; its gather returns the global batch (the other rank's
    # normalised rows beside its own, in rank order): each rank computes the loss one
    # process holding the whole batch computes.
    full = L.hoc_infonce_loss(new, old, labels).item()
    halves = {0: slice(0, 4), 1: slice(4, 8)}

    def gather_for(rank: int):
        other = halves[1 - rank]
        rest = iter(
            [
                torch.nn.functional.normalize(new[other].detach(), dim=1),
                torch.nn.functional.normalize(old[other].detach(), dim=1),
                labels[other],
            ]
        )
        return lambda t: torch.cat([t, next(rest)] if rank == 0 else [next(rest), t])

    for rank, rows in halves.items():
        local = L.hoc_infonce_loss(new[rows], old[rows], labels[rows], gather=gather_for(rank))
        assert local.item() == pytest.approx(full, rel=1e-6)
    with pytest.raises(ValueError, match="mu"):
        L.hoc_infonce_loss(new, old, labels, mu=0.0)


def test_distillation_terms_zero_at_identity():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    logits = torch.randn(6, 4)
    stages = [torch.randn(6, 3, 4, 4), torch.randn(6, 8)]
    assert L.kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert L.cosine_distillation_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert L.l2_feature_loss(x, x.clone()).item() == 0.0
    identity = torch.nn.Identity()
    assert L.projection_loss(identity(x), x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert L.layerwise_alignment_loss(stages, [s.clone() for s in stages]).item() == 0.0
    assert L.mmd(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- MMD properties


def test_mmd_symmetric_and_positive_for_shift():
    torch.manual_seed(1)
    x = torch.randn(20, 3)
    y = torch.randn(15, 3) + 1.0
    assert L.mmd(x, y).item() == pytest.approx(L.mmd(y, x).item(), abs=1e-6)
    assert L.mmd(x, y).item() > 0.05
    assert L.mmd(x, y).item() > L.mmd(x, torch.randn(15, 3)).item()


# ---------------------------------------------------------------- loop references


def mmd_loops(x: torch.Tensor, y: torch.Tensor, sigmas) -> float:
    def k(a, b):
        d2 = sum((float(a[i]) - float(b[i])) ** 2 for i in range(len(a)))
        return sum(math.exp(-d2 / (2 * s * s)) for s in sigmas)

    def mean_k(A, B):
        return sum(k(a, b) for a in A for b in B) / (len(A) * len(B))

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


def batch_hard_loops(emb: torch.Tensor, labels: list[int], margin: float) -> float:
    n = len(labels)
    dist = [[float(torch.linalg.norm(emb[i] - emb[j])) for j in range(n)] for i in range(n)]
    losses = []
    for i in range(n):
        pos = [dist[i][j] for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [dist[i][j] for j in range(n) if labels[j] != labels[i]]
        if pos and neg:
            losses.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(losses) / len(losses) if losses else 0.0


def triplet_distill_loops(new, old, labels, margin):
    new = torch.nn.functional.normalize(new, dim=1)
    old = torch.nn.functional.normalize(old, dim=1)
    losses = []
    for i in range(len(labels)):
        d_ap = float(((new[i] - old[i]) ** 2).sum())
        negs = [
            float(((new[i] - old[n]) ** 2).sum())
            for n in range(len(labels))
            if labels[n] != labels[i]
        ]
        if negs:
            losses.append(max(0.0, d_ap - min(negs) + margin))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmd_matches_loops(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64) * 1.5 + 0.3
    sigmas = (0.5, 1.0, 3.0)
    assert L.mmd(x, y, sigmas).item() == pytest.approx(mmd_loops(x, y, sigmas), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_matches_loops(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(12, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (12,), generator=g)
    expected = batch_hard_loops(emb, labels.tolist(), 0.3)
    assert L.batch_hard_triplet_loss(emb, labels, 0.3).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_distillation_matches_loops(seed):
    g = torch.Generator().manual_seed(seed)
    new = torch.randn(10, 4, generator=g, dtype=torch.float64)
    old = new + 0.5 * torch.randn(10, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (10,), generator=g)
    expected = triplet_distill_loops(new, old, labels.tolist(), 0.1)
    got = L.triplet_distillation_loss(new, old, labels, 0.1).item()
    assert got == pytest.approx(expected, abs=1e-9)


def test_gather_is_applied_to_global_batch():
    # A gather that concatenates a fixed "other rank" batch: the loss must equal the loss of
    # the concatenated batch computed without gather.
    torch.manual_seed(3)
    emb, other = torch.randn(6, 4), torch.randn(6, 4)
    labels, other_labels = torch.randint(0, 3, (6,)), torch.randint(0, 3, (6,))
    extra = {id(emb): other, id(labels): other_labels}

    def gather(t):
        return torch.cat([t, extra[id(t)]])

    full = L.batch_hard_triplet_loss(torch.cat([emb, other]), torch.cat([labels, other_labels]))
    assert L.batch_hard_triplet_loss(emb, labels, gather=gather).item() == pytest.approx(
        full.item()
    )


# ---------------------------------------------------------------- gradients


def test_gradients_flow_and_are_finite():
    torch.manual_seed(0)
    new = torch.randn(8, 5, requires_grad=True)
    old = torch.randn(8, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    w = torch.randn(4, 5, requires_grad=True)
    new_logits = torch.randn(8, 4, requires_grad=True)
    terms = {
        "ce": L.cross_entropy(new_logits, labels),
        "norm_softmax": L.norm_softmax_loss(new, w, labels),
        "kd": L.kd_loss(new_logits, torch.randn(8, 4)),
        "triplet_distill": L.triplet_distillation_loss(new, old, labels),
        "coherence": L.coherence_loss(new, labels, {0: torch.zeros(5), 3: torch.ones(5)}),
        "cosine": L.cosine_distillation_loss(new, old),
        "batch_hard": L.batch_hard_triplet_loss(new, labels),
        "mmd": L.mmd(new, old),
        "l2": L.l2_feature_loss(new, old),
        "projection": L.projection_loss(new, old),
        "layerwise": L.layerwise_alignment_loss([new], [old]),
    }
    for name, loss in terms.items():
        assert loss.ndim == 0, name
        grads = torch.autograd.grad(loss, new if name not in ("ce", "kd") else new_logits)
        assert torch.isfinite(grads[0]).all(), name
        assert grads[0].abs().sum() > 0, name


def test_batch_hard_gradient_finite_with_duplicate_points():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    L.batch_hard_triplet_loss(emb, torch.tensor([0, 0, 1]), margin=2.0).backward()
    assert torch.isfinite(emb.grad).all()


def test_old_side_is_detached():
    new = torch.randn(4, 3, requires_grad=True)
    old = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1])
    total = (
        L.cosine_distillation_loss(new, old)
        + L.l2_feature_loss(new, old)
        + L.triplet_distillation_loss(new, old, labels)
        + L.kd_loss(new, old)
        + L.projection_loss(new, old)
    )
    total.backward()
    assert old.grad is None


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: L.kd_loss(torch.zeros(2, 3), torch.zeros(2, 4)), "new_logits and old_logits"),
        (lambda: L.kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0), "temperature"),
        (lambda: L.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long)), "labels"),
        (lambda: L.cross_entropy(torch.zeros(2, 3), torch.zeros(2)), "labels"),
        (lambda: L.cosine_distillation_loss(torch.zeros(3), torch.zeros(3)), "new_emb"),
        (lambda: L.l2_feature_loss(torch.zeros(2, 3), torch.zeros(2, 2)), "new_feat and old_feat"),
        (lambda: L.mmd(torch.zeros(2, 3), torch.zeros(2, 2)), "x and y"),
        (lambda: L.mmd(torch.zeros(2, 3), torch.zeros(2, 3), sigmas=()), "sigmas"),
        (lambda: L.mmd(torch.zeros(2, 3), torch.zeros(2, 3), sigmas=(1.0, -1.0)), "sigmas"),
        (
            lambda: L.layerwise_alignment_loss([torch.zeros(2, 3)], [torch.zeros(2, 4)]),
            r"new_stages\[0\] and old_stages\[0\]",
        ),
        (lambda: L.layerwise_alignment_loss([torch.zeros(1)], []), "same length"),
        (lambda: L.layerwise_alignment_loss([], []), "new_stages"),
        (
            lambda: L.layerwise_alignment_loss([torch.zeros(1)], [torch.zeros(1)], [1, 2]),
            "weights",
        ),
        (
            lambda: L.coherence_loss(torch.zeros(2, 3), torch.tensor([0, 1]), {0: torch.zeros(2)}),
            "dimension",
        ),
        (lambda: L.coherence_loss(torch.zeros(2, 3), torch.tensor([0, 1]), [1]), "class_means"),
        (
            lambda: L.norm_softmax_loss(torch.zeros(2, 3), torch.zeros(4, 2), torch.tensor([0, 1])),
            "emb and weight",
        ),
        (lambda: L.discriminator_loss(torch.zeros(2, 2), torch.zeros(2)), "disc_logits_new"),
        (lambda: L.grad_reverse(torch.zeros(2), -1.0), "scale"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- pure core


def test_pure_core_imports_no_distributed_or_io_stack():
    code = (
        "import sys, distcl.losses, distcl.models.heads\n"
        "bad = [m for m in ('ray', 'faiss', 'webdataset', 'pyarrow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_old_class_kd_loss_is_kd_on_the_old_columns():
    from distcl.losses import kd_loss, old_class_kd_loss

    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    got = old_class_kd_loss(new, old, (1, 4), 2.0)
    assert torch.allclose(got, kd_loss(new[:, [1, 4]], old[:, [1, 4]], 2.0))
    assert float(old_class_kd_loss(old, old, (0, 2, 3))) == pytest.approx(0.0, abs=1e-6)
