"""Does BatchNorm running-statistics drift alone break compatibility? (docs/results.md)

    .venv/bin/python scripts/bn_drift.py runs/fm6-cl2r

Model 0 of a finished run is copied; the copy only runs forward passes in train mode over
task-1 batches (half the new class and half old-class images, then the new class alone), so
only its BN running statistics change: no gradient step. Printed: the cross-test
M[copy][model 0] (CMC@1) on model 0's classes, against model 0's self-test.
"""

import copy
import json
import sys

import numpy as np
import torch
import yaml

from distcl.config import parse_job
from distcl.data.scenario import Scenario
from distcl.data.sources import load_fashion_mnist
from distcl.eval import compat
from distcl.train.modeling import load_frozen_model


def main(run: str) -> None:
    job = parse_job(yaml.safe_load(open(f"{run}/job.yaml")), "job")
    scen = Scenario.from_json(json.load(open(f"{run}/scenario.json")))
    src = load_fashion_mnist()
    torch.manual_seed(0)
    m0 = load_frozen_model(f"{run}/models/0", job)
    ev = scen.eval_items[np.isin(src.test_labels[scen.eval_items], scen.tasks[0].seen_classes)]
    x = torch.from_numpy(np.stack([src.image("test", i) for i in ev])).float() / 255
    y = src.test_labels[ev]

    def embed(m):
        with torch.no_grad():
            e = torch.cat([m.embed(x[i : i + 500]) for i in range(0, len(x), 500)]).numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    e0 = embed(m0)
    new, old = scen.tasks[1].train_items, scen.tasks[0].train_items
    rng = np.random.default_rng(0)
    for n_new, label in ((16, "half new class, half old (CL2R batch)"), (32, "new class only")):
        m = copy.deepcopy(m0).train()
        with torch.no_grad():
            for _ in range(94):  # 3 epochs of 1000 new-class images, 32 per batch
                idx = [*rng.choice(new, n_new), *rng.choice(old, 32 - n_new)]
                m(torch.from_numpy(np.stack([src.image("train", i) for i in idx])).float() / 255)
        e1 = embed(m.eval())
        M = compat.compatibility_matrix([e0, e1], y, "cmc@1")
        print(
            f"{label}: model 0 self {M[0][0]:.3f}; BN-only copy self {M[1][1]:.3f}, "
            f"cross M[copy][0] {M[1][0]:.3f}, mean cos(old, copy) {np.mean(np.sum(e0 * e1, 1)):.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
