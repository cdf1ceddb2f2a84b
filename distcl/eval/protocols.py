"""Which items each evaluation protocol uses: pure, seeded selections (docs/metrics.md).

Every function takes arrays in the evaluation set's canonical order (items sorted by id) and
returns masks or index arrays in that order, so a selection does not depend on how many
ranks wrote the Parquet parts. No file I/O, Ray or faiss.

- ``closed_subset``: the closed-set evaluation items, at most ``items_per_class`` per class.
- ``open_split``: held-out classes -> probes, gallery items and distractor classes.
- ``verification_pairs``: N genuine and N impostor pairs, shuffled together.
- ``metric_names``: the matrices each protocol reports.

Test: ``.venv/bin/python -m pytest tests/test_protocols.py -q``
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PROTOCOLS = ("closed", "open", "verification", "identification", "openset")
# Seeds of the selections: [seed, stream] so that each draws from its own stream.
_CLOSED_STREAM, _OPEN_STREAM, _PAIRS_STREAM, _OPENSET_STREAM = 5, 14, 15, 16


def closed_subset(labels: np.ndarray, closed: np.ndarray, items_per_class: int | None, seed: int):
    """(N,) bool: the items of ``closed`` (N,) bool kept, at most ``items_per_class`` of each
    class (seeded; None keeps all). Same selection as distcl before held-out classes existed."""
    keep = closed.copy()
    if items_per_class is None:
        return keep
    idx = np.flatnonzero(closed)
    lab = labels[idx]
    rng = np.random.default_rng([seed, _CLOSED_STREAM])
    chosen = [rng.permutation(np.flatnonzero(lab == c))[:items_per_class] for c in np.unique(lab)]
    keep[:] = False
    keep[idx[np.concatenate(chosen)]] = True
    return keep


@dataclass(frozen=True)
class OpenSplit:
    """Probes and gallery of the open-set protocols, as (N,) bool masks over the items."""

    probes: np.ndarray  # (N,) bool: one side of identification / open retrieval
    gallery: np.ndarray  # (N,) bool: the other side (probe classes' other items + distractors)
    distractor_classes: tuple[int, ...]  # classes with gallery items only


def _draw_probes(labels: np.ndarray, pool: np.ndarray, classes, skip, probes_per_class: int,
                 rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """(N,) bool: of each class of ``classes`` not in ``skip``, ``min(probes_per_class, n - 1)``
    of its items in ``pool`` (seeded; drawn class by class in order), so each keeps one."""
    out = np.zeros(len(labels), bool)
    for c in classes:
        if c in skip:
            continue
        idx = np.flatnonzero(pool & (labels == c))
        out[rng.permutation(idx)[: min(probes_per_class, len(idx) - 1)]] = True
    return out


def open_split(
    labels: np.ndarray, pool: np.ndarray, probes_per_class: int, distractor_classes: int, seed: int
) -> OpenSplit:
    """Split the items of ``pool`` (N,) bool into probes and gallery.

    Of the pool's classes, ``distractor_classes`` (seeded) are distractors: all their items
    are gallery. Of every other class, ``min(probes_per_class, n - 1)`` items (seeded) are
    probes and the rest gallery, so each probe's class keeps >= 1 gallery item (a class of one
    item has no probe).
    """
    if probes_per_class < 1:
        raise ValueError(f"eval.probes_per_class must be >= 1, got {probes_per_class}")
    classes = np.unique(labels[pool])
    if not 0 <= distractor_classes < len(classes):
        raise ValueError(
            f"eval.distractor_classes: {distractor_classes} of {len(classes)} evaluated classes "
            "leaves no class to probe"
        )
    rng = np.random.default_rng([seed, _OPEN_STREAM])
    distract = np.sort(rng.choice(classes, distractor_classes, replace=False))
    probes = _draw_probes(labels, pool, classes, distract, probes_per_class, rng)
    if not probes.any():
        raise ValueError("open split: no class has two items, so there is no probe")
    return OpenSplit(probes, pool & ~probes, tuple(int(c) for c in distract))


@dataclass(frozen=True)
class OpenSet:
    """Probes and gallery of open-set 1:N identification (``openset``), (N,) bool masks."""

    probes: np.ndarray  # mated and non-mated probes
    gallery: np.ndarray  # the enrolled classes' other items + the distractor classes' items
    mated: np.ndarray  # (N,) bool: a probe whose class is enrolled
    nonmated_classes: tuple[int, ...]


def openset_split(
    labels: np.ndarray, pool: np.ndarray, probes_per_class: int, nonmated_classes: int | None,
    distractor_classes: int, seed: int,
) -> OpenSet:  # fmt: skip
    """Split the items of ``pool`` (N,) bool (the held-out classes) for 1:N identification:
    ``distractor_classes`` classes (seeded, as ``open_split`` draws them) are gallery only;
    of the others, ``nonmated_classes`` (default: half, at least one) are never enrolled, all
    their items non-mated probes; every other class is enrolled: ``min(probes_per_class,
    n - 1)`` items are mated probes, the rest its gallery."""
    classes = np.unique(labels[pool])
    distract = set(open_split(labels, pool, probes_per_class, distractor_classes,
                              seed).distractor_classes)  # fmt: skip
    rest = np.array([c for c in classes if c not in distract])
    n_non = max(1, len(rest) // 2) if nonmated_classes is None else nonmated_classes
    if not 1 <= n_non < len(rest):
        raise ValueError(
            f"eval.nonmated_classes: {n_non} of the {len(rest)} held-out classes that are not "
            "distractor classes: openset needs at least one non-mated and one enrolled class"
        )
    rng = np.random.default_rng([seed, _OPENSET_STREAM])
    non = np.sort(rng.choice(rest, n_non, replace=False))
    probes = pool & np.isin(labels, non)
    mated = _draw_probes(labels, pool, rest, non, probes_per_class, rng)
    if not mated.any():
        raise ValueError("openset: no enrolled class has two items, so there is no mated probe")
    return OpenSet(probes | mated, pool & ~probes & ~mated, mated,
                   tuple(int(c) for c in non))  # fmt: skip


def verification_pairs(
    labels: np.ndarray, pool: np.ndarray, n_pairs: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_pairs`` genuine and ``n_pairs`` impostor pairs of items of ``pool`` (N,) bool.

    Genuine: a class drawn uniformly among the classes with >= 2 items, then two distinct
    items of it. Impostor: two items drawn uniformly, redrawn until their classes differ.
    The 2 n_pairs pairs are shuffled together (seeded), so every cross-validation fold holds
    both kinds. Returns (a (2P,), b (2P,) item indices, same (2P,) bool).
    """
    idx = np.flatnonzero(pool)
    lab = labels[idx]
    classes, counts = np.unique(lab, return_counts=True)
    multi = classes[counts >= 2]
    if len(multi) == 0 or len(classes) < 2:
        raise ValueError("verification needs a class with two items and at least two classes")
    rng = np.random.default_rng([seed, _PAIRS_STREAM])
    members = {c: idx[lab == c] for c in multi}
    pos = np.empty((n_pairs, 2), np.int64)
    for r, c in enumerate(rng.choice(multi, n_pairs)):
        pos[r] = rng.choice(members[c], 2, replace=False)
    neg = rng.choice(idx, (n_pairs, 2))
    while (bad := labels[neg[:, 0]] == labels[neg[:, 1]]).any():
        neg[bad] = rng.choice(idx, (int(bad.sum()), 2))
    pairs = np.concatenate([pos, neg])  # (2P, 2)
    same = np.concatenate([np.ones(n_pairs, bool), np.zeros(n_pairs, bool)])
    order = rng.permutation(2 * n_pairs)
    return pairs[order, 0], pairs[order, 1], same[order]


def far_name(far: float) -> str:
    """The matrix name of TAR at ``far``: 1e-3 -> "tar@far=1e-3"."""
    mantissa, exp = f"{far:.0e}".split("e")
    return f"tar@far={mantissa}e{int(exp)}"


def retrieval_names(topk: Sequence[int], recall_ks: Sequence[int], metric: str) -> list[str]:
    """Matrices of the retrieval protocols (closed all/seen, open): CMC, Recall@K, mAP."""
    names = [f"cmc@{k}" for k in topk] + [f"recall@{k}" for k in recall_ks] + ["map"]
    return list(dict.fromkeys([*names, metric]))


def metric_names(protocol: str, topk: Sequence[int], recall_ks: Sequence[int], metric: str,
                 fars: Sequence[float],
                 fpirs: Sequence[float] = (1e-3, 1e-2, 1e-1)) -> list[str]:  # fmt: skip
    """The matrix names of ``protocol`` ("all", "seen", "open", "verification",
    "identification", "openset")."""
    if protocol == "verification":
        return ["verif_acc", *(far_name(f) for f in fars)]
    if protocol == "identification":
        return [f"ident_cmc@{k}" for k in topk]
    if protocol == "openset":
        from distcl.eval.metrics import fpir_name

        return ["rank1", *(fpir_name(f) for f in fpirs)]
    return retrieval_names(topk, recall_ks, metric)


def main_metric(protocol: str, metric: str, topk: Sequence[int],
                fpirs: Sequence[float] = (1e-3, 1e-2, 1e-1)) -> str:  # fmt: skip
    """The matrix that AC/AM/BC/FC of ``protocol`` are read from."""
    if protocol == "verification":
        return "verif_acc"
    if protocol == "identification":
        k = int(metric.split("@")[1]) if metric.startswith("cmc@") else min(topk)
        return f"ident_cmc@{k if k in topk else min(topk)}"
    if protocol == "openset":  # TPIR at FPIR 1e-2 (IJB-C's usual point), else the first asked
        from distcl.eval.metrics import fpir_name

        return fpir_name(1e-2 if 1e-2 in fpirs else fpirs[0])
    return metric
