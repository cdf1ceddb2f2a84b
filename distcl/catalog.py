"""What a job can name, without torch: methods (their parameters and needs), alignment
terms, backbones and classifier heads.

The job schema (``distcl.schema``) validates against this catalogue, so loading a job,
the CLI, the driver, a tuning trial's actor and the Ray tasks that build shards never
import torch (``import torch``: ~1.3 s and ~600 MB resident per process). The
implementations register under the same names where torch is: a method subclasses its
spec (``class BCT(BCTSpec, Method)`` in ``distcl.methods.bct``), and tests/test_config.py
checks that every name here has an implementation and every implementation a name here.

    @SPECS.register()
    class MineSpec(MethodSpec):
        name = "mine"
        Params = MineParams                   # its weights (validated when a job loads)
        later_params = frozenset({"alpha"})   # act only from the second task on (tuning)
        @classmethod
        def needs_for(cls, params) -> Needs:  # old model? memory? class means? head?
            ...

Everything the rest of distcl asks of a method is asked here, of its spec: what it needs per
task (:meth:`MethodSpec.needs_for`, and :func:`needs_of` for a job, its replay share
resolved), the keyword arguments of its classifier head (:meth:`MethodSpec.head_kwargs`), an
external old model for its first task (:meth:`MethodSpec.external_old_model`) and which of
its parameters act only once an old model exists (``later_params``). Nothing outside
``catalog.py`` and ``methods/`` reads a method's parameters by name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictFloat

from distcl.registry import Registry

Weight = Annotated[StrictFloat, Field(ge=0)]  #: a loss weight
Positive = Annotated[StrictFloat, Field(gt=0)]  #: a temperature, a bandwidth
ReplayFraction = Annotated[StrictFloat, Field(ge=0, lt=1)]  #: B * f / (1 - f) rows of B from memory


class Params(BaseModel):
    """A method's weights: validated once when the job loads (``method.params``)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True
    )


@dataclass(frozen=True)
class Needs:
    """What a method needs from the engine for one task."""

    old_model: bool = False
    #: Fraction of each batch drawn from the episodic memory (0: no replay).
    replay_fraction: float = 0.0
    #: Running per-class means of stored embeddings (CVS's E_c), as ctx.class_means.
    class_means: bool = False
    #: The old model's class means over the current task's data (BCT's new-class rows).
    old_class_means: bool = False
    #: Train on every task's data so far (joint upper bound).
    all_data: bool = False
    #: Intermediate backbone stages in model outputs (layer-wise alignment).
    stages: bool = False
    #: Classifier head kind this method defaults to.
    head: str = "linear"
    #: Keep exemplars in the episodic memory even without replay (FCT trains its
    #: transformation on them at the end of each task).
    exemplars: bool = False
    #: Train a forward-compatible transformation of model t-1's rows after task t (FCT).
    transform: bool = False

    @property
    def memory(self) -> bool:
        """Whether the episodic memory service keeps exemplars or class means."""
        return self.replay_fraction > 0 or self.class_means or self.exemplars


class MethodSpec:
    """A method as a job names it: ``name``, ``Params`` and what it needs per task."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    #: Parameters (as jobs spell them) that act only when an old model / old classes exist,
    #: i.e. from the second task on, unless :meth:`external_old_model` gives task 0 one
    #: (a tuning search then trains the first task once for all its trials: distcl.tune.base).
    later_params: ClassVar[frozenset[str]] = frozenset()
    #: whether the method trains across a change of architecture (``model.upgrades``): the
    #: previous model, of its own architecture, as the old model; embeddings of different
    #: sizes meet as ``model.dim_change`` says
    supports_upgrades: ClassVar[bool] = True

    @classmethod
    def needs_for(cls, params: Any) -> Needs:
        return Needs()

    @classmethod
    def head_kwargs(cls, params: Any, head: str) -> dict[str, Any]:
        """Keyword arguments of the classifier head ``head`` this method trains with (e.g.
        the NormSoftmax temperature of a cosine head); none: the head's own defaults."""
        return {}

    @classmethod
    def external_old_model(cls, params: Any) -> str | None:
        """A finished model folder of another run to be compatible with from the first task
        on (BCT's ``old_model_dir``), or None."""
        return None


SPECS: Registry[type[MethodSpec]] = Registry("method")


# -- fine-tune and joint: cross-entropy on the current task / on every task so far ---------
class FinetuneParams(Params):
    """No weights."""


@SPECS.register()
class FinetuneSpec(MethodSpec):
    name = "finetune"
    Params = FinetuneParams

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(head="linear")


class JointParams(Params):
    """No weights."""


@SPECS.register()
class JointSpec(MethodSpec):
    name = "joint"
    Params = JointParams

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(all_data=True, head="linear")


# -- LwF: CE + alpha * KD(T) of the old model's logits on the old classes ------------------
class LwFParams(Params):
    alpha: Weight = 1.0  #: weight of the distillation term
    temperature: Positive = 2.0  #: KD temperature (Hinton)


@SPECS.register()
class LwFSpec(MethodSpec):
    name = "lwf"
    Params = LwFParams
    later_params = frozenset({"alpha", "temperature"})  # KD on old classes

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(old_model=True, head="linear")


# -- BCT: new loss + lambda * the old frozen classifier on new embeddings --------------------
class BCTParams(Params):
    lambda_: Weight = Field(1.0, alias="lambda")  #: influence-loss weight (``lambda`` in jobs)
    #: A finished ``models/<t>`` folder to be compatible with from the first task on.
    old_model_dir: str | None = None
    replay_fraction: ReplayFraction = 0.5  #: fraction of each batch drawn from memory


@SPECS.register()
class BCTSpec(MethodSpec):
    name = "bct"
    Params = BCTParams
    later_params = frozenset({"lambda", "replay_fraction"})  # the influence loss, replay

    @classmethod
    def external_old_model(cls, params) -> str | None:
        return params.old_model_dir

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(
            old_model=True,
            old_class_means=True,
            replay_fraction=params.replay_fraction,
            head="linear",
        )


# -- CVS: NormSoftmax + alpha * triplet distillation + beta * coherence to class means -------
class CVSParams(Params):
    alpha: Weight = 10.0  #: neighbour-session triplet distillation weight
    beta: Weight = 1.0  #: inter-session data coherence weight
    temperature: Positive = 0.05  #: NormSoftmax temperature
    margin: Weight = 0.1  #: triplet margin
    replay_fraction: ReplayFraction = 0.25  #: fraction of each batch drawn from memory


@SPECS.register()
class CVSSpec(MethodSpec):
    name = "cvs"
    Params = CVSParams
    later_params = frozenset({"alpha", "beta", "margin", "replay_fraction"})

    @classmethod
    def head_kwargs(cls, params, head: str) -> dict[str, Any]:
        return {"temperature": params.temperature} if head == "cosine" else {}

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(
            old_model=True, replay_fraction=params.replay_fraction, class_means=True, head="cosine"
        )


# -- CL2R: fixed d-simplex classifier + lambda * feature distillation on memory --------------
class CL2RParams(Params):
    lambda_: Weight = Field(
        10.0, alias="lambda"
    )  #: base weight of the feature distillation (``lambda`` in jobs)
    replay_fraction: ReplayFraction = 0.5  #: fraction of each batch drawn from memory


@SPECS.register()
class CL2RSpec(MethodSpec):
    name = "cl2r"
    Params = CL2RParams
    later_params = frozenset({"lambda", "replay_fraction"})  # distillation needs old classes

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(old_model=True, replay_fraction=params.replay_fraction, head="simplex")


# -- HOC: lambda * CE + (1 - lambda) * old/new InfoNCE on a stationary d-simplex ------------
class HOCParams(Params):
    #: weight of the cross-entropy; the old/new InfoNCE term gets 1 - lambda (``lambda``)
    lambda_: Annotated[StrictFloat, Field(ge=0, le=1)] = Field(0.1, alias="lambda")
    mu: Positive = 10.0  #: scale of the old/new similarities (an inverse temperature)
    replay_fraction: ReplayFraction = 0.5  #: fraction of each batch drawn from memory


@SPECS.register()
class HOCSpec(MethodSpec):
    name = "hoc"
    Params = HOCParams
    #: the first task has no old model: plain cross-entropy, whatever lambda and mu are
    later_params = frozenset({"lambda", "mu", "replay_fraction"})

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(old_model=True, replay_fraction=params.replay_fraction, head="simplex")


# -- ER: experience replay (cross-entropy on new data and replayed exemplars) ----------------
class ERParams(Params):
    replay_fraction: ReplayFraction = 0.5  #: fraction of each batch drawn from memory


@SPECS.register()
class ERSpec(MethodSpec):
    name = "er"
    Params = ERParams
    later_params = frozenset({"replay_fraction"})  # no exemplar before the second task

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(replay_fraction=params.replay_fraction, head="linear")


# -- FCT / FastFill: the new model trained as ER, then h: old rows -> new rows -----------------
class FCTParams(Params):
    replay_fraction: ReplayFraction = 0.5  #: the new model's batches: this share from memory
    inner_dim: Annotated[int, Field(ge=1)] = 2048  #: h's mixer width (FCT's: 2048)
    epochs: Annotated[int, Field(ge=1)] = 80  #: h's epochs per task (FCT's: 80)
    batch_size: Annotated[int, Field(ge=2)] = 1024  #: h's global batch (FCT's: 1024)
    lr: Positive = 5e-4  #: Adam (FCT's)
    weight_decay: Weight = 2.0**-15  #: Adam's (FCT's: 2^-15)
    sigma: bool = True  #: FastFill's uncertainty head (false: FCT's plain regression)
    disc_weight: Weight = 1.0  #: FastFill's classification term through the new classifier
    label_smoothing: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.1


@SPECS.register()
class FCTSpec(MethodSpec):
    name = "fct"
    Params = FCTParams
    #: the first task has no older model: no transformation, no replay
    later_params = frozenset(FCTParams.model_fields) | {"replay_fraction"}

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(replay_fraction=params.replay_fraction, head="linear", exemplars=True,
                     transform=True)  # fmt: skip


# -- MMD retrieval: CE + batch-hard triplet + alpha * KD + beta * MMD^2(new, old) -----------
class MMDParams(Params):
    alpha: Weight = 1.0  #: KD weight
    beta: Weight = 1.0  #: MMD weight
    temperature: Positive = 2.0  #: KD temperature
    margin: Weight = 0.3  #: batch-hard triplet margin
    sigmas: Annotated[tuple[Positive, ...], Field(min_length=1)] = (
        0.25,
        0.5,
        1.0,
        2.0,
    )  #: Gaussian kernel bandwidths


@SPECS.register()
class MMDSpec(MethodSpec):
    name = "mmd"
    Params = MMDParams
    later_params = frozenset({"alpha", "beta", "temperature", "sigmas"})  # need the old model

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(old_model=True, head="linear")


def _names(kind: str, names: tuple[str, ...]) -> Registry[str]:
    registry: Registry[str] = Registry(kind)
    for name in names:
        registry.add(name, name)
    return registry


#: ``method.align`` terms (distcl.methods.align), added to any method.
ALIGN_TERM_NAMES = _names("alignment term", ("adversarial", "kd", "l2", "layerwise", "projection"))
#: ``model.backbone`` (distcl.models.backbones).
BACKBONE_NAMES = _names(
    "backbone", ("resnet8", "resnet18", "resnet20", "resnet32", "resnet50", "resnet56")
)
#: ``model.head`` (distcl.models.heads).
HEAD_NAMES = _names("head", ("cosine", "linear", "simplex"))


# -- what a job's method needs, and the architecture a job names -------------------------
def needs_of(job) -> Needs:
    """What the job's method needs per task, its replay share resolved: ``memory.
    replay_fraction`` where set, for a method that replays at all."""
    needs = SPECS[job.method.name].needs_for(job.method.params)
    if needs.replay_fraction > 0 and job.memory.replay_fraction:
        needs = replace(needs, replay_fraction=job.memory.replay_fraction)
    return needs


def head_kwargs(job, head: str | None = None) -> dict[str, Any]:
    """Keyword arguments of the job's classifier head (``head``: another kind, e.g. an old
    model's saved one), from its method's spec."""
    return SPECS[job.method.name].head_kwargs(job.method.params, head or head_kind(job))


@dataclass(frozen=True)
class Arch:
    """The architecture of one task's model (``model_at``)."""

    backbone: str
    embedding_dim: int
    head: str
    small_input: bool


def model_at(job, task: int = 0) -> Arch:
    """The model of task ``task`` (0-indexed): ``model`` with every upgrade of a task <= it
    applied in order (``model.upgrades`` keys are 1-indexed)."""
    m = job.model
    arch = {"backbone": m.backbone, "embedding_dim": m.embedding_dim,
            "head": m.head or SPECS[job.method.name].needs_for(job.method.params).head,
            "small_input": bool(m.small_input)}  # fmt: skip
    for start in sorted(m.upgrades):
        if start - 1 <= task:
            change = m.upgrades[start].model_dump(exclude_none=True)
            arch.update({k: bool(v) if k == "small_input" else v for k, v in change.items()})
    return Arch(**arch)


def upgrade_tasks(job) -> list[int]:
    """The 0-indexed tasks whose model is a new architecture (the first task excluded)."""
    return [t for t in range(1, job.scenario.tasks) if model_at(job, t) != model_at(job, t - 1)]


def head_kind(job, task: int = 0) -> str:
    """The job's classifier head at ``task``: ``model.head`` (or an upgrade's), else its
    method's."""
    return model_at(job, task).head


def head_size(job, num_classes: int, task: int = 0) -> int:
    """Rows of the head, pre-allocated for every class (the d-simplex: its d + 1 vertices)."""
    arch = model_at(job, task)
    if arch.head != "simplex":
        return num_classes
    if arch.embedding_dim + 1 < num_classes:
        field = "model.embedding_dim" if task == 0 else "model.upgrades.embedding_dim"
        raise ValueError(
            f"{field}: the d-simplex head needs embedding_dim >= num_classes - 1 = "
            f"{num_classes - 1}, got {arch.embedding_dim}"
        )
    return arch.embedding_dim + 1


def compat_dim(job, task: int) -> int | None:
    """The size of the space a task's model maps its embeddings into with a learned
    projection (``model.dim_change: projection``): the size before the last upgrade at or
    before ``task`` when that upgrade changed it (the model keeps its projection after it),
    else None."""
    if job.model.dim_change != "projection":
        return None
    ups = [u for u in upgrade_tasks(job) if u <= task]
    if not ups:
        return None
    before = model_at(job, ups[-1] - 1).embedding_dim
    return before if before != model_at(job, ups[-1]).embedding_dim else None


def model_signature_for(job, num_classes: int, in_channels: int, task: int = 0) -> dict[str, Any]:
    """The signature (``distcl.models.embedding.model_signature``) of the model the job
    builds for ``task``, without building it."""
    arch = model_at(job, task)
    sig = {
        "backbone": arch.backbone,
        "in_channels": in_channels,
        "small_input": arch.small_input,
        "embedding_dim": arch.embedding_dim,
        "head": arch.head,
        "num_classes": head_size(job, num_classes, task),
    }
    if (d := compat_dim(job, task)) is not None:
        sig["compat_dim"] = d
    return sig
