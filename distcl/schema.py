"""The job schema: typed, frozen, picklable pydantic models of every section of a job.

Loading, ``--set`` overrides, smoke variants and error messages live in ``distcl.config``
(``load_job``); this module only says what a valid job is. Ranges are in the types
(``Pos``: an integer >= 1, ...), names are checked against their registries (backbone,
head, alignment term), and ``method`` is a union discriminated by ``method.name``: each
method's ``params`` model (``distcl.methods``) validates its own weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    create_model,
    field_validator,
    model_validator,
)
from pydantic import StrictBool as Bool

from distcl import storage
from distcl.catalog import ALIGN_TERM_NAMES, BACKBONE_NAMES, HEAD_NAMES, SPECS
from distcl.storage import Uri

Int = StrictInt
Pos = Annotated[StrictInt, Field(ge=1)]
NonNeg = Annotated[StrictInt, Field(ge=0)]
Fraction = Annotated[StrictFloat, Field(ge=0.0, lt=1.0)]
METRIC = re.compile(r"^(map|(cmc|recall|map)@[1-9][0-9]*)$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _relative_path(value: str | None, field: str) -> str | None:
    """Refuse a path that climbs out of its folder with '..' (URIs pass through)."""
    if value is not None and ".." in PurePosixPath(value.split("://")[-1]).parts:
        raise ValueError(f"{field} must not contain '..' (got {value!r})")
    return value


def _storage_root(value: str | None, field: str) -> str | None:
    """A local path, ``file://``, or an object-store URI that ``distcl.storage`` reaches."""
    value = _relative_path(value, field)
    if value is not None and "://" in value:
        try:
            storage.location(value)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
    return value


class DataConfig(Section):
    """Where images come from and how many of them are used."""

    source: Literal["fashion-mnist", "image-folder", "synthetic"] = "fashion-mnist"
    #: IDX folder (fashion-mnist) or ImageFolder tree; None: the Debian path.
    root: str | None = None
    image_size: Pos = 32  #: image-folder: square side images are resized to
    test_fraction: Annotated[StrictFloat, Field(gt=0, lt=1)] = 0.2  #: image-folder without test/
    train_per_class: Pos | None = None  #: keep at most this many per class (seeded)
    test_per_class: Pos | None = None
    shard_size: Pos = 2000  #: samples per WebDataset shard
    shards_dir: str | None = None  #: None: ``<output.root>/shards/<fingerprint>``
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: Annotated[StrictInt, Field(ge=1, le=100)] = 95
    synthetic_classes: Annotated[StrictInt, Field(ge=2)] = 8
    synthetic_train_per_class: Pos = 64
    synthetic_test_per_class: Pos = 16
    synthetic_size: Annotated[StrictInt, Field(ge=4)] = 16

    _shards = field_validator("shards_dir")(lambda v: _storage_root(v, "data.shards_dir"))


class ScenarioConfig(Section):
    """How classes and items are spread over the incremental tasks."""

    #: disjoint, blurry, general (recurring classes; more tasks than classes), data
    #: (data-incremental: every class in every task, new items each time)
    setup: Literal["disjoint", "blurry", "general", "data"] = "disjoint"
    tasks: Pos = 5
    classes_per_task: Pos | None = None  #: None: classes split evenly over the tasks
    first_task_classes: Pos | None = None  #: a larger base task (BCT, CL2R)
    blurry_fraction: Fraction = 0.1  #: blurry: share of items from other tasks' classes
    recur_prob: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.3  #: general: recurrence probability
    max_tasks: Pos | None = None  #: run only the first N tasks
    shuffle_classes: Bool = True
    heldout_classes: NonNeg = 0  #: classes never trained (open-set protocols), seeded


class ModelUpgrade(Section):
    """The model from a task on: each field given replaces the one before (backbone,
    embedding size, head, stem)."""

    backbone: str | None = None
    embedding_dim: Annotated[StrictInt, Field(ge=2)] | None = None
    head: str | None = None
    small_input: Bool | None = None

    _backbone = field_validator("backbone")(
        lambda v: v and BACKBONE_NAMES.check(v, "model.upgrades.backbone")
    )
    _head = field_validator("head")(lambda v: v and HEAD_NAMES.check(v, "model.upgrades.head"))


class ModelConfig(Section):
    """Backbone, embedding and classifier head (names from their registries), and the
    upgrades of the model at task boundaries."""

    backbone: str = "resnet32"
    embedding_dim: Annotated[StrictInt, Field(ge=2)] = 64
    head: str | None = None  #: linear | cosine | simplex; None: the method's choice
    small_input: Bool = True  #: small-image stem for torchvision ResNets
    #: ``{3: {backbone: resnet56, embedding_dim: 128}}``: the model of task 3 (1-indexed, as
    #: logs and reports number tasks) and later is a new architecture, trained from scratch
    #: with the previous model as its old model (distcl.catalog.model_at)
    upgrades: dict[Annotated[int, Field(ge=2)], ModelUpgrade] = {}  # YAML keys: ints
    #: how embeddings of different sizes meet (training losses and every comparison of an
    #: old row with a new one): ``pad`` (the smaller is zero-padded, as BT^2 and SLERP do;
    #: the larger's extra dimensions drop out of inner products), ``truncate`` (the larger is
    #: cut to the smaller's size and re-normalised, as OCA does), ``projection`` (a learned
    #: linear map of the new embedding into the old space, trained with the new model and
    #: stored with it). docs/upgrades.md
    dim_change: Literal["pad", "truncate", "projection"] = "pad"

    _backbone = field_validator("backbone")(lambda v: BACKBONE_NAMES.check(v, "model.backbone"))
    _head = field_validator("head")(lambda v: v and HEAD_NAMES.check(v, "model.head"))


class AlignConfig(Section):
    """One alignment term added to any method: ``{name: l2, weight: 1.0}``."""

    name: str
    weight: Annotated[StrictFloat, Field(ge=0)] = 1.0
    on: Literal["batch", "memory"] = "batch"  #: memory rows only, or the whole batch

    _name = field_validator("name")(lambda v: ALIGN_TERM_NAMES.check(v, "method.align.name"))


class _MethodBase(Section):
    align: tuple[AlignConfig, ...] = ()


# One variant per registered method: {name: <literal>, params: <its Params>, align: [...]}.
_VARIANTS = [
    create_model(
        f"Method_{name}",
        __base__=_MethodBase,
        __module__=__name__,
        name=(Literal[name], ...),
        params=(cls.Params, cls.Params()),
    )  # fmt: skip
    for name, cls in SPECS.items()
]
globals().update({v.__name__: v for v in _VARIANTS})  # importable by name: picklable


def _variant(name: str) -> type[_MethodBase]:
    return globals()[f"Method_{name}"]


MethodConfig = Annotated[Union[tuple(_VARIANTS)], Field(discriminator="name")]  # noqa: UP007


class MemoryConfig(Section):
    """Episodic memory budget, selection policy and service shards (replay methods)."""

    per_class: Pos | None = 20
    total: Pos | None = None
    selection: Literal["random", "herding"] = "random"
    replay_fraction: Annotated[StrictFloat, Field(gt=0, lt=1)] | None = None  #: None: the method's
    shards: Pos = 1  #: memory service actors, each owning disjoint classes


class TrainConfig(Section):
    """Optimisation and Ray Train resources."""

    epochs: Pos = 2
    first_task_epochs: Pos | None = None  #: None: same as ``epochs``
    batch_size_per_worker: Pos = 64
    lr: Annotated[StrictFloat, Field(gt=0)] = 0.05
    later_lr: Annotated[StrictFloat, Field(gt=0)] | None = None  #: lr after the first task
    momentum: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[StrictFloat, Field(ge=0)] = 5e-4
    workers: Pos = 2
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    threads_per_worker: Pos | None = None  #: torch threads; None: the CPUs loaders leave
    cpus_per_worker: Annotated[StrictFloat, Field(gt=0)] = 1.0
    #: GPU share per worker when GPUs are used: a fraction packs small models (tuning trials)
    #: on one GPU; nccl needs each rank on its own GPU, so a fraction takes 1 worker
    gpus_per_worker: Annotated[StrictFloat, Field(gt=0, le=1)] = 1.0
    #: DataLoader processes per worker that read and decode shards; "auto": the worker's
    #: CPUs beyond its own process (cpus_per_worker - 1, at most 8; 0 reads in-process)
    loader_workers: NonNeg | Literal["auto"] = "auto"
    max_failures: NonNeg = 2  #: worker-group restarts (Ray Train FailureConfig)
    augment: Bool = True  #: random crop + flip
    #: autocast precision of training and of the end-of-task embedding (rows stay float32):
    #: auto = bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPUs
    #: (distcl.train.precision)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    @model_validator(mode="after")
    def _one_rank_per_gpu(self) -> TrainConfig:
        if self.gpus_per_worker < 1 and self.workers > 1:
            raise ValueError(
                f"train.gpus_per_worker: {self.gpus_per_worker:g} (a GPU fraction) needs "
                f"train.workers: 1, got {self.workers} (nccl cannot run two ranks of one run "
                "on one GPU)"
            )
        return self

    def loaders(self) -> int:
        """Loader processes per Train worker (``loader_workers`` resolved)."""
        if self.loader_workers != "auto":
            return self.loader_workers
        return min(8, max(0, int(self.cpus_per_worker) - 1))

    def threads(self) -> int:
        """torch threads per Train worker: set, or the worker's CPUs the loaders leave."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker) - self.loaders())

    def epochs_for(self, task: int) -> int:
        return self.first_task_epochs if task == 0 and self.first_task_epochs else self.epochs

    def lr_for(self, task: int) -> float:
        return self.lr if task == 0 or self.later_lr is None else self.later_lr


Ks = Annotated[tuple[Pos, ...], Field(min_length=1)]
Protocol = Literal["closed", "open", "verification", "identification", "openset"]


class EvalConfig(Section):
    """Retrieval evaluation (protocols and metrics: ``docs/metrics.md``)."""

    metric: str = "cmc@1"  #: of the compatibility matrix: cmc@k, recall@k, map, map@k
    topk: Ks = (1, 5)
    recall_ks: Ks = (1, 5, 10)
    index: Literal["flat", "ivf", "ivfpq"] = "flat"
    #: ivf / ivfpq: IVF lists probed per query; more probes, higher recall, slower search
    #: (the report prints the recall against exact search on a sample of queries)
    nprobe: Pos = 16
    items_per_class: Pos | None = None  #: evaluate on a seeded subset per class
    protocols: Annotated[tuple[Protocol, ...], Field(min_length=1)] = ("closed",)
    ties: Literal["strict", "ties_pass"] = "strict"  #: ECC tie rule
    probes_per_class: Pos = 2  #: open / identification: probes per held-out class
    distractor_classes: NonNeg = 0  #: held-out classes that only add gallery distractors
    verification_pairs: Pos = 1000  #: N positive and N negative pairs
    folds: Annotated[StrictInt, Field(ge=2)] = 10
    fars: Annotated[tuple[Annotated[StrictFloat, Field(gt=0, lt=1)], ...], Field(min_length=1)] = (
        1e-3, 1e-2, 1e-1,
    )  # fmt: skip
    identification: Literal["templates", "items"] = "templates"
    #: openset: held-out classes with no gallery item, all their items non-mated probes
    #: (None: half of the held-out classes that are not distractor classes, at least one)
    nonmated_classes: NonNeg | None = None
    fpirs: Annotated[tuple[Annotated[StrictFloat, Field(gt=0, le=1)], ...], Field(min_length=1)] = (
        1e-3,
        1e-2,
        1e-1,
    )  #: openset: TPIR at these FPIRs
    #: openset: a Parquet store of distractor rows (``model=<t>/`` parts as the gallery's,
    #: one per model) added to every openset gallery (MegaFace's distractors); None: none
    distractors: str | None = None
    exact_map: Bool = True  #: full-ranking mAP where feasible; else mAP@k from top-k lists
    memory_budget_mb: Pos = 1024
    #: faiss-gpu for the gallery search, decided where each search runs: ``auto`` uses a GPU
    #: when that process sees one (a Ray scan task gets one when the cluster has GPUs),
    #: ``yes`` fails where none is usable, ``no`` searches on CPUs
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    #: a named protocol of a paper's code, so a distcl row reads beside its table.
    #: ``iamcl2r`` (HOC's code): held-out classes' probes identified against class templates
    #: (protocols: [identification], identification: templates), strict ECC (a tie fails),
    #: and that matrix's AM over its non-zero entries (docs/metrics.md)
    preset: Literal["none", "iamcl2r"] = "none"

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") == "iamcl2r":
            data = {"protocols": ["identification"], "identification": "templates",
                    "ties": "strict", **data}  # fmt: skip
        return data

    @model_validator(mode="after")
    def _preset_holds(self) -> EvalConfig:
        if self.preset == "iamcl2r":
            wants = {"identification": "templates", "ties": "strict"}
            for field, value in wants.items():
                if getattr(self, field) != value:
                    raise ValueError(f"eval.{field}: eval.preset iamcl2r needs {value!r}, "
                                     f"got {getattr(self, field)!r}")  # fmt: skip
            if "identification" not in self.protocols:
                raise ValueError("eval.protocols: eval.preset iamcl2r needs 'identification'")
        return self

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not METRIC.match(v):
            raise ValueError(f"unknown metric {v!r} (cmc@k, recall@k, map or map@k, k >= 1)")
        return v


class OutputConfig(Section):
    root: str = "runs"  #: a local path, a shared file system, or an object-store URI
    #: experiment tracking (docs/tracking.md): none, mlflow (a server or local store) or
    #: tensorboard (event files in the run directory)
    tracking: Literal["none", "mlflow", "tensorboard"] = "none"
    #: MLflow's tracking URI (http://host:5000, file:/path, sqlite:///path); None: the
    #: environment's MLFLOW_TRACKING_URI
    tracking_uri: str | None = None
    experiment: str = "distcl"  #: the MLflow experiment runs are logged to

    _root = field_validator("root")(lambda v: _storage_root(v, "output.root"))


class SearchSpace(Section):
    """One tuned parameter: ``{type: loguniform, low: 0.1, high: 10}``."""

    type: Literal["uniform", "loguniform", "choice", "grid"]
    low: StrictFloat | None = None
    high: StrictFloat | None = None
    values: tuple[Any, ...] = ()


class TuneConfig(Section):
    """Ray Tune search over config fields (dotted keys: ``method.params.lambda``)."""

    space: dict[str, SearchSpace] = {}
    num_samples: Pos = 8
    #: trials at once; "auto": as many as the cluster holds (lowered to fit in any case)
    max_concurrent_trials: Pos | Literal["auto"] = "auto"
    search: Literal["optuna", "random", "grid"] = "random"
    objective: Literal["ac", "am", "am_if_ac"] = "am"  #: am_if_ac: AM, penalised below ac_floor
    #: two or more metrics (ac, am, bc, fc; all maximised): a Pareto search instead of objective
    objectives: tuple[Literal["ac", "am", "bc", "fc"], ...] = ()
    #: the trade-off best.yaml is written for (Pareto search): a metric of objectives or
    #: weights "w1,w2,..." (one per objective); None: equal weights
    pick: str | None = None
    ac_floor: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.5
    asha: Bool = True  #: ASHA early stopping by task index (Pareto ranks for objectives)
    grace_tasks: Pos = 1
    reduction_factor: Annotated[StrictInt, Field(ge=2)] = 2
    #: the objective's matrix: closed-set all/seen items, or another evaluation protocol
    protocol: Literal["all", "seen", "open", "verification", "identification"] = "seen"
    #: train the first task once per search when no tuned key acts on it (auto), always
    #: (yes: an error when a key does), or never (no)
    shared_base: Literal["auto", "yes", "no"] = "auto"
    confirm_seeds: NonNeg = 0  #: after the search, rerun best and baseline on K seeds
    workers_per_trial: Pos | None = None  #: None: ``train.workers``
    driver_cpus: Annotated[StrictFloat, Field(gt=0)] = 0.1  #: Ray refuses a trial without CPU
    max_trial_failures: NonNeg = 1  #: a failed trial is retried this often, then reported
    start_with_job: Bool = False  #: the first trial runs the job's own values (baseline)

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"a metric appears twice in {list(v)}")
        return v


class JobConfig(Section):
    """One job: everything needed to rebuild the scenario and retrain every model."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    seed: NonNeg = 0
    smoke: Bool = False
    data: DataConfig = DataConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = Field(default_factory=lambda: _variant("finetune")(name="finetune"))
    memory: MemoryConfig = MemoryConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    tune: TuneConfig | None = None

    @property
    def run_dir(self) -> Path | Uri:
        """``<output.root>/<name>``: a local path or an object-store URI (``distcl.storage``)."""
        return storage.join(self.output.root, self.name)

    def data_fingerprint(self) -> str:
        """Hash of everything that decides the shards' content (data, scenario, seed)."""
        blob = {"data": to_dict(self.data), "scenario": to_dict(self.scenario), "seed": self.seed}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def shards_dir(self) -> Path | Uri:
        """``data.shards_dir`` or ``<output.root>/shards/<fingerprint>`` (path or URI)."""
        if self.data.shards_dir:
            return storage.location(self.data.shards_dir)
        return storage.join(self.output.root, "shards", self.data_fingerprint())


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able view of a config object (``lambda`` spelt as in job files)."""
    return obj.model_dump(mode="json", by_alias=True) if isinstance(obj, BaseModel) else obj
