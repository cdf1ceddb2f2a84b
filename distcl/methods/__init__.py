"""Training methods: one small file each, composing loss terms from ``distcl.losses``.

Registries: ``METHODS`` (by ``method.name``) and ``ALIGN_TERMS`` (``method.align`` terms,
added to any method). Importing this package registers every method and term.
"""

from __future__ import annotations

from distcl.methods import bct, cl2r, cvs, er, fct, finetune, hoc, joint, lwf, mmd  # noqa: F401
from distcl.methods.align import ALIGN_TERMS
from distcl.methods.base import METHODS, Batch, Method, Needs, Params, TaskContext

__all__ = ["ALIGN_TERMS", "METHODS", "Batch", "Method", "Needs", "Params", "TaskContext"]
