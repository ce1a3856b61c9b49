"""The CPU-scale experiments the notebooks run: teacher and student configurations, fast and full.

Sizes follow the paper's ratios. Tabular (Table 3, L = 1): MAF teacher 6 blocks / student 3 blocks of
MADE(2 x 32); GLOW teacher and student 3 steps, hidden 64 / 32. Images (Table 5, read as L levels of K
steps): the teacher has 4x the student's steps per level, like the CIFAR-10 pair (K = 32 / 8), at a width
a 2-core CPU can train. ``fast=True`` shrinks everything to seconds: the same code paths, tiny models.

Every student is distilled from the teacher trained with ``teacher_seed`` (one teacher per dataset and
architecture); students vary ``seed``. :func:`flowlib.train.train_or_load` trains each configuration once
and caches it under the checkpoint folder, so any notebook can ask for any model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import info
from .train import TrainConfig

__all__ = ["METHODS", "SIZES", "Budget", "budget", "student_config", "teacher_config"]

METHODS = ("nll", "lkd", "ilkd", "skd")

# (architecture, data kind, role) -> model keyword arguments; "fast" variants are tiny.
SIZES = {
    ("maf", "tabular", "teacher"): {"depth": 6, "hidden": 32},
    ("maf", "tabular", "student"): {"depth": 3, "hidden": 32},
    ("glow", "tabular", "teacher"): {"depth": 3, "hidden": 64},
    ("glow", "tabular", "student"): {"depth": 3, "hidden": 32},
    ("glow", "image", "teacher"): {"levels": 2, "depth": 8, "hidden": 64},
    ("glow", "image", "student"): {"levels": 2, "depth": 2, "hidden": 64},
}
FAST_SIZES = {
    ("maf", "tabular", "teacher"): {"depth": 4, "hidden": 16},
    ("maf", "tabular", "student"): {"depth": 2, "hidden": 16},
    ("glow", "tabular", "teacher"): {"depth": 2, "hidden": 32},
    ("glow", "tabular", "student"): {"depth": 2, "hidden": 8},
    ("glow", "image", "teacher"): {"levels": 2, "depth": 2, "hidden": 16},
    ("glow", "image", "student"): {"levels": 2, "depth": 1, "hidden": 16},
}


@dataclass(frozen=True)
class Budget:
    """Training budget of one run."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int


def budget(kind: str, role: str, fast: bool) -> Budget:
    """Steps, batch size and learning rate for a tabular/image teacher/student run."""
    if fast:
        return Budget(steps=40 if kind == "tabular" else 12, batch_size=256 if kind == "tabular" else 32,
                      lr=2e-3, warmup_steps=5, eval_every=20 if kind == "tabular" else 6)
    if kind == "tabular":
        steps = 4000 if role == "teacher" else 3000
        return Budget(steps=steps, batch_size=512, lr=2e-3, warmup_steps=200, eval_every=250)
    steps = 3000 if role == "teacher" else 2000
    return Budget(steps=steps, batch_size=64, lr=1e-3, warmup_steps=200, eval_every=250)


def _kind(dataset: str) -> str:
    return info(dataset).kind


def teacher_config(arch: str, dataset: str, *, fast: bool = False, seed: int = 0, device: str = "cpu",
                   steps: int | None = None) -> TrainConfig:
    """The teacher for ``arch`` ("glow" or "maf") on ``dataset``."""
    kind = _kind(dataset)
    sizes = (FAST_SIZES if fast else SIZES).get((arch, kind, "teacher"))
    if sizes is None:
        raise ValueError(f"no {arch} configuration for {kind} data ({dataset}); MAF is for tabular sets only")
    b = budget(kind, "teacher", fast)
    return TrainConfig(
        name=f"{dataset}-{arch}-teacher{'-fast' if fast else ''}", arch=arch, model_kwargs=dict(sizes),
        dataset=dataset, steps=steps or b.steps, batch_size=b.batch_size, lr=b.lr,
        warmup_steps=b.warmup_steps, eval_every=b.eval_every, seed=seed, device=device, method="nll",
    )


def student_config(arch: str, dataset: str, method: str = "nll", *, fast: bool = False, seed: int = 0,
                   teacher_seed: int = 0, device: str = "cpu", steps: int | None = None,
                   lambdas: tuple | None = None) -> TrainConfig:
    """A student for ``arch`` on ``dataset``: ``method`` "nll" (no distillation), "lkd", "ilkd" or "skd"."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    kind = _kind(dataset)
    sizes = (FAST_SIZES if fast else SIZES)[(arch, kind, "student")]
    b = budget(kind, "student", fast)
    teacher = teacher_config(arch, dataset, fast=fast, seed=teacher_seed, device=device)
    return TrainConfig(
        name=f"{dataset}-{arch}-student-{method}{'-fast' if fast else ''}", arch=arch,
        model_kwargs=dict(sizes), dataset=dataset, steps=steps or b.steps, batch_size=b.batch_size, lr=b.lr,
        warmup_steps=b.warmup_steps, eval_every=b.eval_every, seed=seed, device=device, method=method,
        lambdas=lambdas, teacher=teacher if method != "nll" else None,
    )
