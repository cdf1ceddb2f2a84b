"""Tests of distcl.models: d-simplex geometry, heads, every registered backbone, the
embedding model and checkpoint signatures.

Run: ``.venv/bin/python -m pytest tests/test_models.py -q``
"""

from __future__ import annotations

import itertools

import pytest
import torch

from distcl.models.backbones import BACKBONES, build_backbone
from distcl.models.embedding import EmbeddingModel, load_state_checked, model_signature
from distcl.models.heads import (
    HEADS,
    CosineHead,
    FixedSimplexHead,
    LinearHead,
    build_head,
    dsimplex,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions on a shared 2-core machine: one intra-op thread avoids
    # oversubscription (3x faster here); restored afterwards for other test modules.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- d-simplex


@pytest.mark.parametrize("k", [2, 3, 10, 100])
def test_dsimplex_geometry(k):
    w = dsimplex(k)
    d = k - 1
    assert w.shape == (k, d) and w.dtype == torch.float32
    w64 = w.double()
    gram = w64 @ w64.T  # (K, K)
    assert torch.allclose(gram.diagonal(), torch.ones(k, dtype=torch.float64), atol=1e-6)
    off = gram[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / d), atol=1e-6)
    assert torch.allclose(w64.sum(0), torch.zeros(d, dtype=torch.float64), atol=1e-5)
    assert torch.equal(dsimplex(k), w)  # deterministic


def test_dsimplex_small_cases_by_hand():
    # K = 2: the two points +-1 on the line; K = 3: an equilateral triangle, angle 120 deg.
    assert torch.equal(dsimplex(2).abs(), torch.ones(2, 1))
    assert dsimplex(2).sum().item() == 0.0
    w = dsimplex(3)
    assert (w[0] @ w[1]).item() == pytest.approx(-0.5, abs=1e-6)


@pytest.mark.parametrize("bad", [0, 1, 2.0, True, -3])
def test_dsimplex_rejects_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        dsimplex(bad)


# ---------------------------------------------------------------- heads


def test_fixed_simplex_head_is_not_trained():
    head = FixedSimplexHead(10)
    assert list(head.parameters()) == []
    assert "weight" in head.state_dict()
    assert torch.equal(head.weight, dsimplex(10))
    x = torch.randn(4, 9)
    assert torch.allclose(head(x), x @ dsimplex(10).T)


def test_fixed_simplex_head_checks_embedding_dim():
    with pytest.raises(ValueError, match="embedding_dim = K - 1 = 9, got in_dim=64"):
        build_head("simplex", 64, 10)
    with pytest.raises(ValueError, match=r"shape \(B, 9\)"):
        FixedSimplexHead(10)(torch.randn(2, 8))


def test_cosine_head_logits_are_cosines_over_temperature():
    head = CosineHead(2, 2, temperature=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    logits = head(torch.tensor([[3.0, 0.0]]))
    assert torch.allclose(logits, torch.tensor([[2.0, 2.0**0.5]]))


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_builds_and_runs(kind):
    in_dim, num_classes = 9, 10  # the simplex head needs in_dim = K - 1
    head = build_head(kind, in_dim, num_classes)
    assert head.kind == kind and head.num_classes == num_classes and head.in_dim == in_dim
    logits = head(torch.randn(3, in_dim))
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()


def test_build_head_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown head .arcface. \(known: \[.cosine"):
        build_head("arcface", 8, 3)


def test_linear_head_matches_nn_linear_math():
    head = LinearHead(4, 3)
    x = torch.randn(2, 4)
    assert torch.allclose(head(x), x @ head.weight.T + head.bias)


# ---------------------------------------------------------------- backbones


def _case(name: str) -> tuple[int, int]:
    # resnet50 only on 3x32x32 to keep the suite fast; the others on 28x28, 1 and 3 channels.
    return (3, 32) if name == "resnet50" else (1, 28)


@pytest.mark.parametrize(
    "name, small_input", list(itertools.product(sorted(BACKBONES), [True, False]))
)
def test_every_backbone_features_and_stages(name, small_input):
    torch.manual_seed(0)
    channels, size = _case(name)
    module, feature_dim = build_backbone(name, channels, small_input)
    x = torch.rand(2, channels, size, size)
    feats = module(x)
    assert feats.shape == (2, feature_dim)
    feats2, stages = module(x, return_stages=True)
    assert torch.allclose(feats, feats2, atol=1e-5)
    assert len(stages) == len(module.stage_channels) >= 3
    for stage, width in zip(stages, module.stage_channels, strict=True):
        assert stage.ndim == 4 and stage.shape[:2] == (2, width)
    assert stages[-1].shape[1] == feature_dim


def test_backbone_feature_dims():
    assert build_backbone("resnet32", 3, True)[1] == 64
    assert build_backbone("resnet18", 1, True)[1] == 512
    resnet32, _ = build_backbone("resnet32", 3, True)
    assert resnet32(torch.rand(2, 3, 32, 32)).shape == (2, 64)  # CIFAR size works too
    with pytest.raises(ValueError, match=r"unknown backbone .vit. \(known: "):
        build_backbone("vit", 3, True)


def test_resnet32_depth():
    module, _ = build_backbone("resnet32", 1, True)
    convs = [
        m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(convs) == 31  # stem + 3 stages x 5 blocks x 2 (+ the fc makes 32 layers)


# ---------------------------------------------------------------- embedding model


def _model(**kw) -> EmbeddingModel:
    args = dict(backbone="resnet32", in_channels=1, embedding_dim=16, head="cosine", num_classes=5)
    args.update(kw)
    return EmbeddingModel(**args)


def test_embedding_model_outputs():
    torch.manual_seed(0)
    model = _model()
    x = torch.rand(4, 1, 28, 28)
    out = model(x)
    assert set(out) == {"feat", "emb", "logits"}
    assert out["feat"].shape == out["emb"].shape == (4, 16)
    assert out["logits"].shape == (4, 5)
    assert torch.allclose(out["emb"].norm(dim=1), torch.ones(4), atol=1e-5)
    model.eval()
    assert torch.allclose(model.embed(x), model(x)["emb"])
    with_stages = model(x, return_stages=True)
    assert len(with_stages["stages"]) == 3


def test_embedding_model_has_a_signed_linear_embedding_layer():
    # Pooled post-ReLU features are >= 0; the embedding layer must make signed embeddings
    # even when the dims match (the d-simplex head needs them).
    model = _model(embedding_dim=64)
    assert isinstance(model.projection, torch.nn.Linear)
    model.eval()
    emb = model.embed(torch.rand(8, 1, 28, 28))
    assert (emb < 0).any()


def test_embedding_model_input_normalisation_is_a_buffer():
    model = _model(mean=(0.25,), std=(0.5,))
    state = model.state_dict()
    assert torch.equal(state["input_mean"].flatten(), torch.tensor([0.25]))
    assert "input_mean" not in dict(model.named_parameters())
    rgb = _model(backbone="resnet18", in_channels=3, embedding_dim=8)
    assert rgb.input_mean.shape == (1, 3, 1, 1)
    # the backbone sees (x - mean) / std: a constant image equal to the mean gives zeros.
    seen = {}
    rgb.backbone.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    rgb.eval()
    rgb(rgb.input_mean.expand(1, 3, 8, 8).clone())
    assert torch.allclose(seen["x"], torch.zeros(1, 3, 8, 8), atol=1e-6)


def test_embedding_model_simplex_head():
    model = _model(head="simplex", num_classes=10, embedding_dim=9)
    assert model(torch.rand(2, 1, 28, 28))["logits"].shape == (2, 10)
    with pytest.raises(ValueError, match="embedding_dim = K - 1"):
        _model(head="simplex", num_classes=10, embedding_dim=16)


def test_embedding_model_head_kwargs():
    assert _model(head_kwargs={"temperature": 0.1}).head.temperature == 0.1


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.rand(2, 3, 28, 28), r"\(B, 1, H, W\)"),
        (torch.rand(1, 28, 28), r"\(B, 1, H, W\)"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "float"),
    ],
)
def test_embedding_model_rejects_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        _model()(x)


def test_embedding_model_rejects_bad_mean():
    with pytest.raises(ValueError, match="in_channels"):
        _model(mean=(0.1, 0.2))


# ---------------------------------------------------------------- signatures / checkpoints


def test_signature_roundtrip_load():
    torch.manual_seed(0)
    source = _model()
    target = _model()
    load_state_checked(target, source.state_dict(), model_signature(source))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    # DDP-prefixed keys are accepted
    ddp_state = {f"module.{k}": v for k, v in source.state_dict().items()}
    load_state_checked(_model(), ddp_state, model_signature(source))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"embedding_dim": 32}, "checkpoint embedding_dim=16 but job says 32"),
        ({"backbone": "resnet18"}, "checkpoint backbone=resnet32 but job says resnet18"),
        ({"head": "linear"}, "checkpoint head=cosine but job says linear"),
        ({"num_classes": 7}, "checkpoint num_classes=5 but job says 7"),
        ({"in_channels": 3}, "checkpoint in_channels=1 but job says 3"),
    ],
)
def test_signature_mismatch_names_field(change, message):
    saved = _model()
    with pytest.raises(ValueError, match=message):
        load_state_checked(_model(**change), saved.state_dict(), model_signature(saved))


def test_signature_without_a_field_is_refused():
    model = _model(head="linear")
    with pytest.raises(ValueError, match="signature has no field 'small_input'"):
        sig = model_signature(model)
        del sig["small_input"]
        load_state_checked(model, model.state_dict(), sig)


@pytest.mark.parametrize(
    "method,backbone,small_input",
    [("finetune", "resnet32", True), ("cvs", "resnet18", False), ("cl2r", "resnet18", True)],
)
def test_the_jobs_signature_without_building_its_model(synthetic_job, method, backbone,
                                                       small_input):  # fmt: skip
    """distcl.catalog.model_signature_for (no torch: a tuning trial checks a shared base
    with it) equals the signature of the model the job builds (linear, cosine, simplex)."""
    from distcl.catalog import model_signature_for
    from distcl.train.modeling import build_model

    job = synthetic_job(method={"name": method},
                        model={"backbone": backbone, "small_input": small_input})  # fmt: skip
    for classes, channels in ((8, 1), (5, 3)):
        built = model_signature(build_model(job, classes, channels))
        assert model_signature_for(job, classes, channels) == built
