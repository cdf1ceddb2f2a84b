"""Continual-learning scenarios: which classes and items arrive at each task (pure, seeded).

    scen = build_scenario(train_labels, test_labels, job.scenario, seed=job.seed,
                          train_per_class=..., test_per_class=...)

Setups (CVS paper's names):
- ``disjoint``: class-incremental; each task introduces its own classes, no class recurs.
- ``blurry``: as disjoint, but a ``blurry_fraction`` of each task's training items is drawn
  from other tasks' classes (those items are moved, so every item is trained on once).
- ``general``: classes are introduced as in disjoint and a class already introduced
  recurs in a later task with probability ``recur_prob``; its training items are split
  between its introduction and its recurrences. With more tasks than classes (long
  sequences: 50 tasks of Fashion-MNIST's 10 classes) the classes are introduced over the
  first tasks (one group per task, as disjoint splits them over as many tasks as there are
  classes) and the later tasks hold recurrences only; a task that draws no recurrence gets
  one seen class (seeded), so every task trains on something.
- ``data``: data-incremental (BCT's "new training data" upgrade): every task trains on all
  the scenario's classes, each class's training items split evenly over the tasks (new items
  per task); the first task introduces every class.

Retrieval convention (documented in the README): the test split of every class of the
scenario is the evaluation set. A class's test items *arrive in the gallery* with the tasks
that train on that class (split evenly over them, in task order); after task t the stored
gallery holds every test item that arrived at tasks <= t, embedded by the model of its
arrival task. Queries are test items of the classes seen so far.

Held-out classes (``heldout=N``, the job's ``scenario.heldout_classes``): the last N classes
of the seeded class order are never trained on (no task has them); their test items
(``heldout_items``, subsampled like the evaluation set) are embedded by every model for the
open-set protocols (``open``, ``verification``, ``identification``: docs/metrics.md). The
remaining classes are split over the tasks as above. Without held-out classes a scenario is
identical to (and has the same digest as) one built before held-out classes existed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from distcl.schema import ScenarioConfig


@dataclass(frozen=True)
class Task:
    """One incremental step."""

    index: int  # 0-based
    new_classes: tuple[int, ...]  # classes introduced by this task
    train_classes: tuple[int, ...]  # classes with training items in this task
    seen_classes: tuple[int, ...]  # every class trained on at tasks <= index
    train_items: np.ndarray  # (n,) indices into the source's train split
    gallery_items: np.ndarray  # (m,) indices into the test split arriving with this task


@dataclass(frozen=True)
class Scenario:
    setup: str
    seed: int
    class_order: tuple[int, ...]
    tasks: tuple[Task, ...]
    eval_items: np.ndarray  # (N_eval,) test indices: every class of the scenario
    heldout_classes: tuple[int, ...] = ()  # classes no task trains on (open-set protocols)
    heldout_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (N_h,)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def classes(self) -> tuple[int, ...]:
        return self.tasks[-1].seen_classes

    def to_json(self) -> dict:
        out = {
            "setup": self.setup,
            "seed": self.seed,
            "class_order": list(self.class_order),
            "eval_items": self.eval_items.tolist(),
            "tasks": [
                {
                    "index": t.index,
                    "new_classes": list(t.new_classes),
                    "train_classes": list(t.train_classes),
                    "seen_classes": list(t.seen_classes),
                    "train_items": t.train_items.tolist(),
                    "gallery_items": t.gallery_items.tolist(),
                }
                for t in self.tasks
            ],
        }
        if self.heldout_classes:  # omitted when empty: older scenario digests stay valid
            out["heldout_classes"] = list(self.heldout_classes)
            out["heldout_items"] = self.heldout_items.tolist()
        return out

    @classmethod
    def from_json(cls, d: dict) -> Scenario:
        tasks = tuple(
            Task(
                index=t["index"],
                new_classes=tuple(t["new_classes"]),
                train_classes=tuple(t["train_classes"]),
                seen_classes=tuple(t["seen_classes"]),
                train_items=np.asarray(t["train_items"], np.int64),
                gallery_items=np.asarray(t["gallery_items"], np.int64),
            )
            for t in d["tasks"]
        )
        return cls(
            d["setup"], d["seed"], tuple(d["class_order"]), tasks,
            np.asarray(d["eval_items"], np.int64),
            tuple(d.get("heldout_classes", ())),
            np.asarray(d.get("heldout_items", []), np.int64),
        )  # fmt: skip

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def subsample_per_class(labels: np.ndarray, limit: int | None, rng: np.random.Generator):
    """Indices keeping at most ``limit`` items of each class (sorted, seeded)."""
    if limit is None:
        return np.arange(len(labels))
    keep = [rng.permutation(np.flatnonzero(labels == c))[:limit] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def _split_classes(
    order: list[int], tasks: int, per_task: int | None, first: int | None = None
) -> list[list[int]]:
    n = len(order)
    head: list[list[int]] = []
    if first is not None:
        if not 1 <= first <= n - (tasks - 1):
            raise ValueError(
                f"scenario.first_task_classes: {first} classes in the first task leaves "
                f"{n - first} of {n} for {tasks - 1} later tasks (each needs at least one)"
            )
        head, order, tasks, n = [order[:first]], order[first:], tasks - 1, n - first
    if per_task is None:
        if n < tasks:
            raise ValueError(f"scenario.tasks: {tasks} tasks but only {n} classes")
        sizes = [n // tasks + (1 if i < n % tasks else 0) for i in range(tasks)]
    else:
        if per_task * tasks > n:
            raise ValueError(
                f"scenario.classes_per_task: {tasks} x {per_task} classes but only {n} exist"
            )
        sizes = [per_task] * tasks
    out, start = list(head), 0
    for s in sizes:
        out.append(order[start : start + s])
        start += s
    return out


def intro_tasks(cfg: ScenarioConfig, n_classes: int) -> int:
    """How many tasks introduce classes: every task (disjoint, blurry), the first
    min(tasks, classes) (general: the later ones recur only), the first (data)."""
    if cfg.setup == "data":
        return 1
    if cfg.setup == "general":
        return min(cfg.tasks, n_classes if cfg.classes_per_task is None else max(
            1, (n_classes - (cfg.first_task_classes or 0)) // cfg.classes_per_task
            + (1 if cfg.first_task_classes else 0)))  # fmt: skip
    return cfg.tasks


def check_class_split(cfg: ScenarioConfig, num_classes: int) -> None:
    """The checks :func:`build_scenario` makes on class counts, on the counts alone (no data
    read): a ValueError naming the field when ``num_classes`` cannot be split as ``cfg``
    asks. Run when a job loads (``distcl.config``), before any Ray starts."""
    heldout = cfg.heldout_classes
    intro = intro_tasks(cfg, num_classes - heldout)
    if heldout and num_classes - heldout < intro:
        raise ValueError(
            f"scenario.heldout_classes: holding out {heldout} of {num_classes} classes leaves "
            f"{num_classes - heldout} for {cfg.tasks} tasks (each needs at least one class)"
        )
    if num_classes - heldout < 1:
        raise ValueError(f"scenario.heldout_classes: {heldout} of {num_classes} leaves none")
    if cfg.setup == "data":
        return
    _split_classes(list(range(num_classes - heldout)), intro, cfg.classes_per_task,
                   cfg.first_task_classes)  # fmt: skip


def build_scenario(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    cfg: ScenarioConfig,
    seed: int,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    *,
    heldout: int = 0,
) -> Scenario:
    """The scenario for ``cfg`` and ``seed``; identical for every method of a seed.

    ``heldout``: the last ``heldout`` classes of the seeded class order are held out of
    training (``scenario.heldout_classes``); the rest are split over the tasks.
    """
    rng = np.random.default_rng([seed, 7])
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    classes = sorted(np.unique(train_labels).tolist())
    order = [classes[i] for i in rng.permutation(len(classes))] if cfg.shuffle_classes else classes
    if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 0:
        raise ValueError(f"scenario.heldout_classes must be an int >= 0, got {heldout!r}")
    n_left = len(order) - heldout
    if heldout and n_left < intro_tasks(cfg, n_left):
        raise ValueError(
            f"scenario.heldout_classes: holding out {heldout} of {len(order)} classes leaves "
            f"{n_left} for {cfg.tasks} tasks (each needs at least one class)"
        )
    order, held = order[:n_left], order[n_left:]
    if cfg.setup == "data":  # every class at the first task, new items at every task
        groups = [list(order)] + [[] for _ in range(cfg.tasks - 1)]
    else:
        groups = _split_classes(order, intro_tasks(cfg, n_left), cfg.classes_per_task,
                                cfg.first_task_classes)  # fmt: skip
        groups += [[] for _ in range(cfg.tasks - len(groups))]  # general: recurrences only
    train_pool = subsample_per_class(train_labels, train_per_class, rng)
    test_pool = subsample_per_class(test_labels, test_per_class, rng)
    T = len(groups)

    # Which tasks train on each class, and the per-task training items.
    class_tasks: dict[int, list[int]] = {c: [t] for t, g in enumerate(groups) for c in g}
    if cfg.setup == "data":
        for ts in class_tasks.values():
            ts.extend(range(1, T))
    if cfg.setup == "general":
        for ts in class_tasks.values():
            later = [t for t in range(ts[0] + 1, T) if rng.random() < cfg.recur_prob]
            ts.extend(later)
        for t in range(T):  # a long sequence: a task without any class gets a seen one
            if not any(t in ts for ts in class_tasks.values()):
                seen = [c for c, ts in class_tasks.items() if ts[0] < t]
                ts = class_tasks[seen[int(rng.integers(len(seen)))]]
                ts.append(t)
                ts[1:] = sorted(ts[1:])
    items: list[list[np.ndarray]] = [[] for _ in range(T)]
    for c, ts in class_tasks.items():
        idx = rng.permutation(train_pool[train_labels[train_pool] == c])
        if len(ts) == 1:
            items[ts[0]].append(idx)
        elif cfg.setup == "data":  # an even share of the class's items per task
            for t, part in zip(ts, np.array_split(idx, len(ts)), strict=True):
                items[t].append(part)
        else:  # general: half at introduction, the rest split over recurrences
            half = len(idx) // 2
            items[ts[0]].append(idx[:half])
            for t, part in zip(ts[1:], np.array_split(idx[half:], len(ts) - 1), strict=True):
                items[t].append(part)
    task_items = [np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in items]

    if cfg.setup == "blurry" and T > 1 and cfg.blurry_fraction > 0:
        # Move a fraction of each task's own items to a random other task.
        moved: list[list[np.ndarray]] = [[] for _ in range(T)]
        kept = []
        for t, idx in enumerate(task_items):
            idx = rng.permutation(idx)
            n_move = int(round(len(idx) * cfg.blurry_fraction))
            dest = rng.choice([u for u in range(T) if u != t], size=n_move)
            for u in range(T):
                moved[u].append(idx[:n_move][dest == u])
            kept.append(idx[n_move:])
        task_items = [np.concatenate([kept[t], *moved[t]]) for t in range(T)]

    # Gallery arrivals: a class's test items split over the tasks that train on it.
    train_classes = [sorted(set(train_labels[idx].tolist())) for idx in task_items]
    arrive: list[list[np.ndarray]] = [[] for _ in range(T)]
    for c in order:
        trained_at = [t for t in range(T) if c in train_classes[t]]
        if not trained_at:
            continue
        idx = rng.permutation(test_pool[test_labels[test_pool] == c])
        if cfg.setup == "blurry":  # minor appearances do not bring gallery items
            trained_at = [class_tasks[c][0]]
        for t, part in zip(trained_at, np.array_split(idx, len(trained_at)), strict=True):
            arrive[t].append(part)

    n_run = T if cfg.max_tasks is None else min(cfg.max_tasks, T)
    tasks, seen = [], set()
    for t in range(n_run):
        seen |= set(train_classes[t])
        tasks.append(
            Task(
                index=t,
                new_classes=tuple(groups[t]),
                train_classes=tuple(train_classes[t]),
                seen_classes=tuple(c for c in order if c in seen),
                train_items=np.sort(task_items[t]).astype(np.int64),
                gallery_items=np.sort(np.concatenate(arrive[t] or [np.zeros(0, np.int64)])).astype(
                    np.int64
                ),
            )
        )
    eval_items = np.sort(np.concatenate([t.gallery_items for t in tasks])).astype(np.int64)
    heldout_items = np.sort(test_pool[np.isin(test_labels[test_pool], held)]).astype(np.int64)
    return Scenario(
        cfg.setup, seed, tuple(order), tuple(tasks), eval_items, tuple(held), heldout_items
    )
