"""Model upgrades at task boundaries (``model.upgrades``) and embeddings of different sizes
meeting (``model.dim_change``): the pure maps of training (distcl.losses.dims) and evaluation
(distcl.eval.spaces), each mode against a hand computation; job validation.

Run: ``.venv/bin/python -m pytest tests/test_upgrades.py -q``
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distcl.catalog import compat_dim, model_at, model_signature_for, upgrade_tasks
from distcl.config import ConfigError
from distcl.eval.spaces import Spaces
from distcl.losses.dims import common_dim, common_space

NEW = torch.tensor([[3.0, 4.0, 12.0, 0.0]])  # (1, 4)
OLD = torch.tensor([[1.0, 0.0]])  # (1, 2)


def test_pad_compares_a_larger_new_embedding_through_its_first_old_dimensions():
    new, old = common_space(NEW, OLD, "pad")
    assert new.tolist() == [[3.0, 4.0]] and old is OLD
    # the inner product of the new row with the zero-padded old row, exactly
    padded = torch.nn.functional.pad(OLD, (0, 2))
    assert float(new @ old.T) == float(NEW @ padded.T) == 3.0
    small_new, _ = common_space(OLD, NEW, "pad")  # a smaller new one is padded instead
    assert small_new.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_truncate_cuts_the_larger_side_and_renormalises_unit_embeddings():
    new, old = common_space(NEW, OLD, "truncate", renormalize=True)
    assert torch.allclose(new, torch.tensor([[0.6, 0.8]]))
    new, old = common_space(NEW, OLD, "truncate")  # features: cut, not renormalised
    assert new.tolist() == [[3.0, 4.0]]
    new, old = common_space(OLD, NEW, "truncate", renormalize=True)  # the old is larger
    assert new is OLD and torch.allclose(old, torch.tensor([[0.6, 0.8]]))
    assert common_dim(4, 2, "truncate") == 2 and common_dim(2, 4, "truncate") == 2
    assert common_dim(2, 4, "pad") == 4 and common_dim(4, 2, "projection") == 2


def test_equal_sizes_pass_through_and_projection_needs_the_models_map():
    a, b = common_space(OLD, OLD * 2, "truncate")
    assert a is OLD and torch.equal(b, OLD * 2)
    with pytest.raises(ValueError, match="projection"):
        common_space(NEW, OLD, "projection")


def test_the_evaluation_maps_each_mode():
    rows4 = np.array([[0.6, 0.8, 0.0, 0.0], [0.0, 0.0, 0.6, 0.8]], np.float32)
    rows2 = np.array([[1.0, 0.0]], np.float32)
    pad = Spaces({0: 2, 1: 4}, "pad")
    q, g, d = pad.maps(1, 0)
    assert g is None and d == 2
    np.testing.assert_allclose(q(rows4), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    trunc = Spaces({0: 2, 1: 4}, "truncate")
    np.testing.assert_allclose(trunc.queries(rows4[:1], 1, 0), [[0.6, 0.8]], rtol=1e-6)
    shrink = Spaces({0: 4, 1: 2}, "truncate")  # the new model is the smaller: old rows are cut
    q, g, d = shrink.maps(1, 0)
    assert q is None and d == 2
    np.testing.assert_allclose(g(rows4[:1]), [[0.6, 0.8]], rtol=1e-6)
    assert Spaces({0: 4, 1: 2}, "pad").queries(rows2, 1, 0).tolist() == [[1, 0, 0, 0]]
    # projection: the learned maps of every upgrade between the two models, then normalised
    p1 = np.array([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], np.float32)  # (2, 4): 4 -> 2
    proj = Spaces({0: 2, 1: 4, 2: 4}, "projection", {1: p1})
    np.testing.assert_allclose(proj.queries(rows4, 2, 0), [[0.8, 0.6], [0.0, 0.0]], atol=1e-6)
    assert proj.maps(2, 1)[0] is None  # models 1 and 2 share a size: nothing between them
    with pytest.raises(ValueError, match="no learned projection"):
        Spaces({0: 2, 1: 4}, "projection").queries(rows4, 1, 0)


def test_upgrades_in_a_job(synthetic_job):
    job = synthetic_job(
        method={"name": "cl2r"}, scenario={"tasks": 4},
        model={"embedding_dim": 8, "dim_change": "projection",
               "upgrades": {3: {"backbone": "resnet20", "embedding_dim": 16}}},
    )  # fmt: skip
    assert [model_at(job, t).backbone for t in range(4)] == ["resnet32"] * 2 + ["resnet20"] * 2
    assert [model_at(job, t).embedding_dim for t in range(4)] == [8, 8, 16, 16]
    assert upgrade_tasks(job) == [2] and compat_dim(job, 1) is None
    assert compat_dim(job, 2) == compat_dim(job, 3) == 8  # kept by the model after its upgrade
    sig = model_signature_for(job, 8, 1, 2)
    assert sig["backbone"] == "resnet20" and sig["num_classes"] == 17 and sig["compat_dim"] == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": {"upgrades": {5: {"embedding_dim": 16}}}}, "model.upgrades: task 5"),
        ({"model": {"upgrades": {1: {"embedding_dim": 16}}}}, "model.upgrades"),
        ({"model": {"upgrades": {2: {"backbone": "resnet99"}}}}, "unknown backbone 'resnet99'"),
        ({"model": {"upgrades": {2: {"embedding_dim": 4}}}, "method": {"name": "cl2r"}},
         "model.upgrades.embedding_dim: the d-simplex head needs embedding_dim >= "),
        ({"model": {"upgrades": {2: {"backbone": "resnet20"}}},
          "method": {"name": "finetune", "align": [{"name": "layerwise"}]}},
         "method.align: layerwise"),
        ({"model": {"dim_change": "stretch"}}, "model.dim_change"),
    ],
)  # fmt: skip
def test_bad_upgrades_are_refused_at_load_time_naming_the_field(synthetic_job, overrides,
                                                                  message):  # fmt: skip
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        synthetic_job(**overrides)
