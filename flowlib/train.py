"""One training loop for teachers, plain students and distilled students, with resumable checkpoints.

* :class:`TrainConfig` -- every setting of a run as literals; :func:`config_hash` names its directory.
* :func:`train` -- AdamW (the paper's optimizer, section 4.2) with linear warm-up and gradient-norm
  clipping on the loss of Eq. 15 (:func:`flowlib.distill.distillation_loss`; plain NLL for teachers and
  students); evaluation on a validation split every ``eval_every`` steps; ``best.pt`` (lowest validation
  NLL) and ``last.pt`` (everything needed to resume) written atomically; a divergence guard.
* :func:`train_or_load` -- ``<root>/<name>-<hash>/``: load a finished run, resume a partial one, or train
  (the teacher of a distilled config first). With early stopping ``steps`` is only a cap and not part of
  the hash: raising it extends a run that stopped at the old cap.

Reproducibility: batches, per-batch dequantisation noise and SKD noise come from one ``torch.Generator``
seeded from ``config.seed``; its state, the global RNG state, the model, the optimizer and the history
are saved in ``last.pt``, so an interrupted run resumed from it ends exactly where an uninterrupted run
would (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bijectors import ImagePreprocess, NonFiniteBatchError, cached_weights, dequantize
from .checkpoints import (
    CHECKPOINT_VERSION,
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from .distill import (
    DISTANCES,
    PRESETS,
    SKD_MODES,
    bits_per_dim_from_log_prob,
    distillation_loss,
    freeze,
    resolve_method,
)
from .distill import (
    NLL_UNITS as DISTILL_NLL_UNITS,
)
from .models import MAF, Glow, build_model
from .precision import PRECISIONS, conditioner_precision

__all__ = [
    "CheckpointError", "TrainConfig", "TrainingDiverged", "config_diff", "config_hash", "convergence",
    "evaluate", "evaluations_without_improvement", "history_frame", "is_trained", "load_checkpoint",
    "load_model", "rehash_checkpoints", "remove_stale_temporaries", "resolve_device", "save_checkpoint",
    "train", "train_or_load", "training_lock", "training_subset",
]

# Keys that do not change what is computed and are left out of the hash and the config comparison.
_NON_IDENTITY_KEYS = ("device",)
# Fields added after checkpoints of earlier versions existed: they enter a config's identity (its hash, the
# stored-config check) only when not at this default, so older checkpoints keep their names.
_ADDED_FIELDS = {"lambda_schedule": "constant", "patience": None, "train_fraction": 1.0, "precision": "fp32"}
LAMBDA_SCHEDULES = ("constant", "decay")
NLL_UNITS = ("auto", *DISTILL_NLL_UNITS)  # "auto": bits/dim for images, nats for tabular data


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm stopped training; the checkpoints on disk are the last good ones."""

    def __init__(self, step: int, last_loss: float | None, what: str = "loss"):
        self.step, self.last_loss, self.what = step, last_loss, what
        last = "none yet" if last_loss is None else f"{last_loss:.6g}"
        super().__init__(
            f"training diverged at step {step}: the {what} is not finite (last finite loss: {last}). "
            f"The checkpoints were not overwritten; lower lr, raise warmup_steps or set grad_clip"
        )


@dataclass
class TrainConfig:
    """Every setting of one run, as literals (so it hashes to a stable name, :func:`config_hash`).

    ``arch`` / ``model_kwargs``: :func:`flowlib.models.build_model` arguments (the shape comes from the
    data). ``dataset``: the name given to ``data_fn(name, split)``. ``method``: ``"nll"`` (teachers and
    plain students), ``"lkd"``, ``"ilkd"`` or ``"skd"`` (:data:`flowlib.distill.PRESETS`); ``lambdas``
    overrides the preset's Eq. 15 weights; ``lambda_schedule="decay"`` lowers the distillation weights
    ``l1, l2`` linearly from their value at the first step towards 0 at the last (:meth:`lambdas_at`).
    ``teacher``: the teacher's own :class:`TrainConfig` (needed by :func:`train_or_load` for distilled
    methods). ``preprocess`` (``"glow"`` or ``"logit"``) and
    ``bins`` apply to integer (image) data, dequantised per batch. ``lr``: the paper uses 5e-5 with
    batches of 65,536; ``weight_decay`` is AdamW's default (the paper states none); ``grad_clip`` 30 as in
    the official code (``None`` disables it). ``device`` does not enter the hash, nor does a field added
    later (``lambda_schedule``, ``patience``, ``train_fraction``) while it keeps its default, so older
    checkpoints keep their names.

    Distillation settings (:func:`flowlib.distill.distillation_loss`): ``distance`` ``"mse"`` (the official
    code, the default) or ``"l1"`` (the paper's text); ``skd_mode`` ``"official"`` or ``"paper"``;
    ``nll_unit`` ``"auto"`` puts the NLL into Eq. 15 in bits/dim for images and nats/sample for tabular
    data, as the official code does (``"nats"`` / ``"bits/dim"`` force one).

    Convergence: with ``patience`` set, training evaluates every ``eval_every`` steps and stops once the
    validation NLL has not improved for ``patience`` evaluations in a row; ``steps`` is then the cap. The
    best-validation weights are what :func:`train` leaves in the model and :func:`train_or_load` returns.
    ``train_fraction`` < 1 trains on that share of the training rows: the first rows of one fixed
    permutation of the training set (the same for every seed and model, and nested: 10% is inside 30%).
    """

    name: str = "model"
    arch: str = "maf"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str | None = None
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float | None = 30.0
    eval_every: int = 100
    eval_batch_size: int = 1024
    seed: int = 0
    device: str = "cpu"
    method: str = "nll"
    lambdas: tuple | None = None
    lambda_schedule: str = "constant"
    distance: str = "mse"
    temperature: float = 0.7
    skd_samples: int | None = None
    skd_mode: str = "official"
    nll_unit: str = "auto"
    patience: int | None = None
    train_fraction: float = 1.0
    pairs: tuple | None = None
    teacher: TrainConfig | None = None
    preprocess: str = "glow"
    bins: int = 256
    precision: str = "fp32"

    def __post_init__(self):
        if isinstance(self.teacher, dict):
            self.teacher = TrainConfig.from_dict(self.teacher)
        if self.lambdas is not None:
            self.lambdas = tuple(float(v) for v in self.lambdas)
            if len(self.lambdas) != 3:
                raise ValueError(f"lambdas must be (l0, l1, l2), got {self.lambdas}")
        if self.pairs is not None:
            self.pairs = tuple(tuple(int(i) for i in p) for p in self.pairs)
        self.model_kwargs = dict(self.model_kwargs)
        resolve_method(self.method)
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise ValueError(f"unknown lambda_schedule {self.lambda_schedule!r}; choose one of "
                             f"{', '.join(LAMBDA_SCHEDULES)}")
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; choose one of {', '.join(DISTANCES)}")
        if self.nll_unit not in NLL_UNITS:
            raise ValueError(f"unknown nll_unit {self.nll_unit!r}; choose one of {', '.join(NLL_UNITS)}")
        if self.skd_mode not in SKD_MODES:
            raise ValueError(f"unknown skd_mode {self.skd_mode!r}; choose one of {', '.join(SKD_MODES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)} "
                             f"(bf16: the coupling networks of training steps, see flowlib.precision)")
        if self.preprocess not in ("glow", "logit"):
            raise ValueError(f"unknown preprocess {self.preprocess!r}; choose 'glow' or 'logit'")
        self._validate()

    def _validate(self) -> None:
        """Every field's type and range, each failure a ``ValueError`` naming the field and the fix."""
        def bad(key: str, need: str):
            raise ValueError(f"TrainConfig.{key} {need}, got {getattr(self, key)!r}")

        if not isinstance(self.name, str) or not self.name.strip() or self.name in (".", "..") \
                or any(sep in self.name for sep in ("/", "\\", os.sep, "\0")):
            bad("name", "must be a plain folder name (no path separators, not '.' or '..'): it names the "
                        "checkpoint folder <checkpoint_root>/<name>-<hash>")
        if not isinstance(self.arch, str) or self.arch.lower() not in ARCHS:
            bad("arch", f"must be one of {', '.join(ARCHS)}")
        for key in ("steps", "batch_size", "eval_every", "eval_batch_size"):
            if not _integer(getattr(self, key)) or getattr(self, key) < 1:
                bad(key, "must be an integer >= 1")
        if not _integer(self.bins) or self.bins < 2:
            bad("bins", "must be an integer >= 2 (the number of quantisation levels of the images)")
        if not _integer(self.warmup_steps) or self.warmup_steps < 0:
            bad("warmup_steps", "must be an integer >= 0")
        if not _integer(self.seed):
            bad("seed", "must be an integer")
        if not _finite_number(self.lr) or self.lr <= 0:
            bad("lr", "must be a finite number > 0")
        if not _finite_number(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "must be a finite number >= 0")
        if self.grad_clip is not None and (not _finite_number(self.grad_clip) or self.grad_clip <= 0):
            bad("grad_clip", "must be a finite number > 0 (the largest gradient norm), or None for no "
                             "clipping")
        if self.patience is not None and (not _integer(self.patience) or self.patience < 1):
            bad("patience", "must be an integer >= 1 (evaluations without a better validation NLL before "
                            "training stops), or None to run all steps")
        if not _finite_number(self.train_fraction) or not 0 < self.train_fraction <= 1:
            bad("train_fraction", "must be a number in (0, 1]: the share of the training rows used")
        if not _finite_number(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (SKD's sampling temperature)")
        if self.skd_samples is not None and (not _integer(self.skd_samples) or self.skd_samples < 1):
            bad("skd_samples", "must be an integer >= 1, or None for one sample per batch element")
        if self.lambdas is not None and not all(math.isfinite(v) for v in self.lambdas):
            bad("lambdas", "must be three finite weights (l0, l1, l2)")
        if not isinstance(self.device, str):
            bad("device", "must be a string such as 'cpu', 'cuda' or 'auto'")

    @property
    def distilled(self) -> bool:
        """True when the loss uses a teacher (a non-zero l1 or l2 weight)."""
        _, l1, l2 = self.lambdas_at(1)  # the first step carries the full weights under every schedule
        return l1 != 0 or l2 != 0

    def lambdas_at(self, step: int) -> tuple[float, float, float]:
        """Eq. 15's weights ``(l0, l1, l2)`` at training step ``step`` (1-based). ``"constant"``: the preset's
        (or ``lambdas``) throughout. ``"decay"``: ``l1`` and ``l2`` times ``1 - (step - 1) / steps``, so the
        teacher's signal is strongest at the start and the last steps are (almost) NLL alone; ``l0`` stays."""
        weights = self.lambdas if self.lambdas is not None else PRESETS[resolve_method(self.method)].lambdas
        l0, l1, l2 = weights
        if self.lambda_schedule == "decay":
            f = 1.0 - (step - 1) / self.steps
            l1, l2 = l1 * f, l2 * f
        return (l0, l1, l2)

    def to_dict(self) -> dict:
        """Plain nested dict (the teacher config included)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


ARCHS = ("glow", "maf")


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _steps_is_a_cap(d: dict) -> bool:
    """Whether ``steps`` only bounds the run: with early stopping (``patience``) and constant Eq. 15 weights
    nothing computed before the cap depends on it (the learning rate is warm-up then constant), so a run is
    identified without it; raising the cap extends a run that stopped at it and leaves plateaued runs as
    they are."""
    return d.get("patience") is not None and d.get("lambda_schedule", "constant") == "constant"


def _identity_dict(d: dict, nested: bool = False) -> dict:
    out = {k: v for k, v in d.items()
           if k not in _NON_IDENTITY_KEYS and not (k in _ADDED_FIELDS and v == _ADDED_FIELDS[k])}
    # a teacher's cap stays in its students' identity: a teacher stopped at its cap has other weights when
    # the cap is raised, and the students distilled from the old ones must not be taken for new ones
    if _steps_is_a_cap(d) and not nested:
        out.pop("steps", None)
    if isinstance(out.get("teacher"), dict):
        out["teacher"] = _identity_dict(out["teacher"], nested=True)
    return out


def _canonical(d: dict) -> str:
    return json.dumps(_identity_dict(d), sort_keys=True, separators=(",", ":"), default=list)


def config_hash(config: TrainConfig | dict, length: int = 10) -> str:
    """Short stable hash (sha256 hex prefix) of the config's canonical JSON (sorted keys, no ``device``)."""
    d = config.to_dict() if isinstance(config, TrainConfig) else config
    return hashlib.sha256(_canonical(d).encode()).hexdigest()[:length]


def config_diff(a: TrainConfig | dict, b: TrainConfig | dict, prefix: str = "") -> list[str]:
    """Keys (dotted for the teacher config) whose values differ between two configs, ``device`` ignored."""
    da = _identity_dict(a.to_dict() if isinstance(a, TrainConfig) else a, nested=bool(prefix))
    db = _identity_dict(b.to_dict() if isinstance(b, TrainConfig) else b, nested=bool(prefix))
    out = []
    for key in sorted(set(da) | set(db)):
        va, vb = da.get(key), db.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key == "teacher":
            out += config_diff(va, vb, prefix=f"{prefix}{key}.")
        elif json.dumps(va, sort_keys=True, default=list) != json.dumps(vb, sort_keys=True, default=list):
            out.append(f"{prefix}{key}")
    return out


def _check_same_config(stored: dict, config: TrainConfig, path) -> None:
    diff = config_diff(stored, config)
    if diff:
        s, g = _identity_dict(stored), _identity_dict(config.to_dict())
        details = ", ".join(
            f"{k} (stored {_lookup(s, k)!r}, given {_lookup(g, k)!r})" for k in diff
        )
        raise ValueError(
            f"checkpoint {path} was written with a different config; differing keys: {details}. "
            f"Use the matching config, another checkpoint directory, or delete {Path(path).parent}"
        )


def _check_within_cap(ck: dict, config: TrainConfig, path) -> None:
    """A stored run that trained past ``config.steps`` is not ``config``'s run (capped there it would have
    stopped earlier, possibly with other best weights)."""
    if int(ck["step"]) > config.steps:
        raise ValueError(
            f"checkpoint {path} trained to step {int(ck['step'])}, beyond this config's cap "
            f"steps={config.steps}; use steps >= {int(ck['step'])}, another checkpoint directory, or delete "
            f"{Path(path).parent}"
        )


def _finished_for(ck: dict, config: TrainConfig) -> bool:
    """Whether the stored run (a ``last.pt`` dict) is finished for ``config``: it finished, and either
    stopped on its validation plateau or at a cap ``config`` does not raise (a raised cap extends it)."""
    if not ck.get("finished"):
        return False
    history = ck.get("history") or []
    plateaued = bool(history) and history[-1].get("stopped") == "patience"
    return plateaued or int(ck["step"]) >= config.steps


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` / ``"cuda:N"`` (error if CUDA is absent) or ``"auto"`` (CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was requested but CUDA is not available on this machine "
                           f"(torch.cuda.is_available() is False); set device='cpu' or 'auto'")
    return dev


def _derive_seed(seed: int, tag: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{tag}".encode()).digest()[:8], "little") % (2**63)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def _as_tensor(data, what: str) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if hasattr(data, "tensors"):  # TensorDataset: the first tensor holds the data, labels are ignored
        return data.tensors[0]
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        return data[0]
    if hasattr(data, "__array__"):
        return torch.as_tensor(data)
    raise TypeError(
        f"{what} must be a tensor (N, ...), an array, or a TensorDataset; got {type(data).__name__}"
    )


class _BatchStream:
    """Shuffled epochs of indices drawn with a seeded generator; its state is saved for resuming."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            if self.perm is None or self.pos >= self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos: self.pos + take])
            self.pos, need = self.pos + take, need - take
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], int(state["pos"])


def training_subset(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """The first ``round(fraction * N)`` rows (at least 1) of one fixed permutation of ``x``.

    The permutation depends only on ``N``, so every seed and model trained with the same fraction sees the
    same rows, and a smaller fraction's rows are a subset of a larger one's."""
    if fraction >= 1:
        return x
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_derive_seed(n, "train_fraction")))
    return x[perm[: max(1, round(fraction * n))]]


def _to_model_space(xb: torch.Tensor, preprocess: ImagePreprocess | None, bins: int,
                    generator: torch.Generator | None, ref: torch.Tensor):
    """Integer images -> dequantise (generator) -> preprocess; float data as is. Returns (y, pre_logdet)."""
    if preprocess is not None:
        x01 = dequantize(xb, bins, generator=generator)
        y, pre_logdet = preprocess(x01)
        return y.to(device=ref.device, dtype=ref.dtype), pre_logdet.to(device=ref.device, dtype=ref.dtype)
    y = xb.to(device=ref.device, dtype=ref.dtype)
    return y, None


def evaluate(model: nn.Module, data, preprocess: str | nn.Module | None = "glow", bins: int = 256,
             batch_size: int = 1024, seed: int = 0) -> dict[str, float]:
    """Mean NLL (nats per sample, model space) and bits/dim of ``data`` under ``model`` in eval mode.

    ``data`` is a tensor or an iterable of batches. Integer (image) data is dequantised with a generator
    seeded from ``seed`` (the same noise at every evaluation) and mapped by ``preprocess`` (a kind or an
    :class:`~flowlib.bijectors.ImagePreprocess`); float data is used as is. Bits/dim follows
    :func:`flowlib.distill.bits_per_dim`. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    ref = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    image_pre = preprocess if isinstance(preprocess, nn.Module) else ImagePreprocess(preprocess or "glow")
    batches: Iterable = (
        (data[i: i + batch_size] for i in range(0, len(data), batch_size))
        if isinstance(data, torch.Tensor) else (_as_tensor(b, "a validation batch") for b in data)
    )
    total_nll, total_bpd, count = 0.0, 0.0, 0
    try:
        with torch.inference_mode(), cached_weights(model):  # fixed weights: derived ones computed once
            for xb in batches:
                pre = None if xb.is_floating_point() else image_pre
                y, _ = _to_model_space(xb, pre, bins, gen, ref)
                log_prob = model.log_prob(y)
                total_nll += -log_prob.double().sum().item()
                total_bpd += bits_per_dim_from_log_prob(log_prob, y, pre, bins).double().sum().item()
                count += y.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate() got no data")
    return {"nll": total_nll / count, "bpd": total_bpd / count}


def history_frame(history: list[dict]):
    """The history as a pandas DataFrame, with each loss term in its own ``term_<name>`` column."""
    import pandas as pd

    rows = []
    for rec in history:
        row = {k: v for k, v in rec.items() if k != "terms"}
        row.update({f"term_{k}": v for k, v in rec.get("terms", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def load_model(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Rebuild the model stored in a ``best.pt`` / ``last.pt`` and load its weights (eval mode)."""
    ck = load_checkpoint(path)
    config = TrainConfig.from_dict(ck["config"])
    model = build_model(config.arch, tuple(ck["input_shape"]), **config.model_kwargs)
    model.load_state_dict(ck["model"])
    return model.to(resolve_device(device)).eval()


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

def _check_arch(model: nn.Module, config: TrainConfig) -> None:
    expected = {"glow": Glow, "maf": MAF}.get(config.arch.lower())
    if expected is not None and isinstance(model, (Glow, MAF)) and not isinstance(model, expected):
        raise ValueError(f"config.arch is {config.arch!r} but the model is a {type(model).__name__}")


def train(model: nn.Module, train_data, val_data, config: TrainConfig, teacher: nn.Module | None = None,
          checkpoint_dir: str | os.PathLike | None = None, progress: bool = True, resume: bool = True,
          batch_hook: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
          distributed=None) -> list[dict]:
    """Train ``model`` on ``train_data`` with the loss of ``config.method`` (Eq. 15); return the history.

    Each step ``s = 1..config.steps`` draws a batch (shuffled epochs, seeded generator), dequantises
    integer images with the same generator, and minimises ``distillation_loss(teacher, model, x)``
    (teacher and student see the same batch) with AdamW, learning rate warmed up linearly over
    ``warmup_steps`` and gradients clipped to norm ``grad_clip``. Every ``eval_every`` steps and at the
    end: validation NLL / bits/dim (:func:`evaluate`), ``best.pt`` when the validation NLL improves and
    ``last.pt`` (model, optimizer, generator and RNG states, history) in ``checkpoint_dir``. With
    ``resume`` and an existing ``last.pt`` (same config, ``device`` aside) training continues from it.

    A non-finite loss or gradient norm raises :class:`TrainingDiverged` at that step, before anything
    is written. ``batch_hook(step, x)`` (tests, debugging) may return a replacement batch or raise.

    ``distributed``: a :class:`flowlib.train_ddp.DataParallel` when this process is one rank of a
    ``torch.distributed`` group (``python -m flowlib.train_ddp``). Every rank then draws the same global
    batch of ``config.batch_size`` rows and keeps its share, gradients are averaged across ranks by
    ``DistributedDataParallel``, and only rank 0 writes checkpoints: the same steps as one process with
    that batch, and the same checkpoints (either can resume the other's).

    History rows: ``step, loss, nll, bpd`` (training batch), ``terms`` (dict), ``val_nll, val_bpd``
    (NaN between evaluations), ``lr, grad_norm, time`` (seconds since the run started). The model is
    left with the final weights (``best.pt`` holds the best ones).
    """
    method = resolve_method(config.method)
    _check_arch(model, config)
    device = resolve_device(config.device)
    model.to(device)
    distilled = config.distilled
    if distilled:
        if teacher is None:
            raise ValueError(f"method {config.method!r} distils from a teacher: pass teacher=<trained model>")
        freeze(teacher.to(device))
    x_train = _as_tensor(train_data, "train_data")
    if len(x_train) == 0:
        raise ValueError("train_data is empty")
    x_train = training_subset(x_train, config.train_fraction)
    _check_finite_data(x_train, "train_data")
    _check_finite_data(val_data, "val_data")
    image = not x_train.is_floating_point()
    preprocess = ImagePreprocess(config.preprocess) if image else None
    nll_unit = config.nll_unit if config.nll_unit != "auto" else ("bits/dim" if image else "nats")
    dim = math.prod(x_train.shape[1:])
    ref = next(model.parameters())

    generator = torch.Generator().manual_seed(_derive_seed(config.seed, "batches"))
    stream = _BatchStream(len(x_train), config.batch_size, generator)
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach: one multi-tensor kernel per update instead of ~10 small ops per parameter tensor (PyTorch uses
    # it by default only on GPUs); the same numbers bit for bit, 3-7% off a notebook-size CPU training step
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    history: list[dict] = []
    best_val, start_step, elapsed0 = math.inf, 0, 0.0
    best_state: dict | None = None  # best-validation weights, kept in memory when training stops early

    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    writer = distributed is None or distributed.is_writer  # under torch.distributed: rank 0 alone
    if distributed is not None:
        distributed.check(config)
    if ckdir is not None and writer:
        remove_stale_temporaries(ckdir)  # left by a process killed while writing a checkpoint
    if ckdir is not None and resume and (ckdir / "last.pt").exists():
        ck = load_checkpoint(ckdir / "last.pt")  # CPU: generator states must stay on the CPU
        _check_same_config(ck["config"], config, ckdir / "last.pt")
        _check_within_cap(ck, config, ckdir / "last.pt")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        stream.load_state_dict(ck["stream"])
        torch.set_rng_state(ck["torch_rng"].cpu())
        history, best_val = list(ck["history"]), float(ck["best_val"])
        start_step, elapsed0 = int(ck["step"]), float(ck["elapsed"])
        if config.patience is not None and (ckdir / "best.pt").exists():
            best_state = load_checkpoint(ckdir / "best.pt")["model"]
        finished = _finished_for(ck, config)  # else unfinished, or stopped at a cap that config raises: go on
    else:
        finished = False
    if distributed is not None:  # every rank must resume from the same checkpoint, or none
        distributed.agree(start_step + (0.5 if finished else 0.0), "the step it resumes from")
    if finished:
        if best_state is not None:
            model.load_state_dict(best_state)
        return history

    def checkpoint(step: int, finished: bool) -> None:
        if ckdir is None or not writer:
            return
        save_checkpoint(ckdir / "last.pt", {
            "version": CHECKPOINT_VERSION, "config": config.to_dict(), "input_shape": list(x_train.shape[1:]),
            "step": step, "finished": finished, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "stream": stream.state_dict(),
            "torch_rng": torch.get_rng_state(), "history": history, "best_val": best_val,
            "elapsed": time.perf_counter() - t0 + elapsed0,
        })

    bar = None
    if progress and writer:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc=f"{config.name} [{config.method}]")
    t0 = time.perf_counter()
    last_loss = next((h["loss"] for h in reversed(history) if math.isfinite(h["loss"])), None)
    best_bpd = _best_val_bpd(history)
    model.train()
    # the frozen teacher's weights do not change: its derived weights (LU, MADE masks) are computed once
    teacher_weights = cached_weights(teacher) if distilled else contextlib.nullcontext()
    try:
        with teacher_weights:
            for step in range(start_step + 1, config.steps + 1):
                xb = x_train[stream.next()]
                if batch_hook is not None:
                    replaced = batch_hook(step, xb)
                    xb = xb if replaced is None else replaced
                    if xb.is_floating_point() and not bool(torch.isfinite(xb).all()):
                        raise ValueError(f"the training batch of step {step} (returned by batch_hook) "
                                         f"contains NaN or inf; nothing was updated or saved")
                y, pre_logdet = _to_model_space(xb, preprocess, config.bins, generator, ref)
                batch_pre_logdet = pre_logdet  # the whole batch's, for the logged NLL
                if distributed is not None:  # this rank's share of the batch every rank drew
                    y, pre_logdet = distributed.shard(model, y, pre_logdet)
                lr = config.lr * min(1.0, step / config.warmup_steps) if config.warmup_steps else config.lr
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_fn = distillation_loss if distributed is None else distributed.loss
                try:
                    with conditioner_precision(config.precision):
                        out = loss_fn(
                            teacher if distilled else None, model, y, method=method,
                            lambdas=config.lambdas_at(step),
                            pairs=config.pairs, distance=config.distance, temperature=config.temperature,
                            n_samples=config.skd_samples, generator=generator, skd_mode=config.skd_mode,
                            nll_unit=nll_unit, pre_logdet=pre_logdet, bins=config.bins,
                        )
                except NonFiniteBatchError as err:  # the batch was finite (checked): a layer overflowed
                    raise TrainingDiverged(step, last_loss, "value inside the model") from err
                loss = out.total
                finite = bool(torch.isfinite(loss))
                if distributed is not None:  # every rank stops, or none does
                    finite = distributed.all_true(finite)
                if not finite:
                    raise TrainingDiverged(step, last_loss, "loss")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                max_norm = config.grad_clip if config.grad_clip is not None else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
                if not torch.isfinite(grad_norm):
                    raise TrainingDiverged(step, last_loss, "gradient norm")
                optimizer.step()

                values = out.items() if distributed is None else distributed.mean(out.items())
                last_loss = values["loss"]
                if nll_unit == "bits/dim":  # the term is already bits/dim of the dequantised data
                    bpd_value = values["nll"]
                    nats_value = bpd_value * dim * math.log(2.0)  # back to model-space nats per sample
                    if preprocess is not None:
                        nats_value += float(batch_pre_logdet.mean()) - dim * math.log(config.bins)
                else:
                    nats_value = nll_value = values["nll"]
                    if preprocess is not None:
                        nll_value -= float(batch_pre_logdet.mean()) - dim * math.log(config.bins)
                    bpd_value = nll_value / (dim * math.log(2.0))
                rec = {
                    "step": step, "loss": values["loss"], "nll": nats_value,
                    "bpd": bpd_value,
                    "terms": {k: v for k, v in values.items() if k != "loss"},
                    "val_nll": math.nan, "val_bpd": math.nan, "lr": lr, "grad_norm": float(grad_norm),
                    "time": time.perf_counter() - t0 + elapsed0,
                }
                history.append(rec)
                evaluate_now = step % config.eval_every == 0 or step == config.steps
                stop = step == config.steps
                if evaluate_now:
                    if not _parameters_finite(model):
                        raise TrainingDiverged(step, last_loss, "model's weights after the update")
                    val = evaluate(model, val_data, preprocess or config.preprocess, config.bins,
                                   config.eval_batch_size, seed=_derive_seed(config.seed, "val"))
                    rec["val_nll"], rec["val_bpd"] = val["nll"], val["bpd"]
                    # nothing is saved from a run that has left the finite world: the files keep the last
                    # good one
                    if not math.isfinite(val["nll"]):
                        raise TrainingDiverged(step, last_loss, "validation NLL")
                    if val["nll"] < best_val:
                        best_val, best_bpd = val["nll"], val["bpd"]
                        if config.patience is not None:
                            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        if ckdir is not None and writer:
                            save_checkpoint(ckdir / "best.pt", {
                                "version": CHECKPOINT_VERSION, "config": config.to_dict(),
                                "input_shape": list(x_train.shape[1:]), "step": step,
                                "model": model.state_dict(), "val_nll": val["nll"], "val_bpd": val["bpd"],
                            })
                    waited = evaluations_without_improvement(history)
                    if config.patience is not None and waited >= config.patience:
                        stop = True
                        rec["stopped"] = "patience"
                    checkpoint(step, finished=stop)
                if bar is not None:
                    post = {"loss": f"{rec['loss']:.4g}", "bpd": f"{rec['bpd']:.4g}"}
                    if math.isfinite(best_val):
                        post["best_val_bpd"] = f"{best_bpd:.4g}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if stop:
                    break
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def evaluations_without_improvement(history: list[dict]) -> int:
    """How many validation evaluations since the last one that lowered the best validation NLL (0 when the
    latest evaluation is the best so far)."""
    vals = [h["val_nll"] for h in history if math.isfinite(h.get("val_nll", math.nan))]
    if not vals:
        return 0
    best_index = min(range(len(vals)), key=lambda i: (vals[i], i))
    return len(vals) - 1 - best_index


def convergence(history: list[dict]) -> dict:
    """Where a run stopped and whether validation had plateaued: ``best_step`` (lowest validation NLL),
    ``last_step`` (last evaluation), ``stopped_by`` (``"patience"`` or ``"steps"``: the cap) and
    ``plateaued`` (``best_step < last_step``: later evaluations did not improve on the best)."""
    evals = [h for h in history if math.isfinite(h.get("val_nll", math.nan))]
    if not evals:
        return {"best_step": None, "last_step": None, "stopped_by": None, "plateaued": False,
                "best_val_nll": None}
    best = min(evals, key=lambda h: (h["val_nll"], h["step"]))
    last = evals[-1]
    return {"best_step": int(best["step"]), "last_step": int(last["step"]),
            "stopped_by": "patience" if last.get("stopped") == "patience" else "steps",
            "plateaued": best["step"] < last["step"], "best_val_nll": float(best["val_nll"])}


def _check_finite_data(data, what: str) -> None:
    """A NaN or inf in the data is a data error, reported before training starts (not a divergence later)."""
    tensors = [data] if isinstance(data, torch.Tensor) else [] if data is None else None
    if tensors is None:
        try:
            tensors = [_as_tensor(data, what)]
        except TypeError:  # an iterable of batches: checked batch by batch when evaluated
            return
    for t in tensors:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t.reshape(len(t), -1))).any(1).nonzero().flatten()
            raise ValueError(f"{what} contains NaN or inf in {len(bad)} row(s) (first: row {int(bad[0])}); "
                             f"clean or drop those rows before training")


def _parameters_finite(model: nn.Module) -> bool:
    params = [p.detach() for p in model.parameters()]
    if not params:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all())


def _best_val_bpd(history: list[dict]) -> float:
    vals = [(h["val_nll"], h["val_bpd"]) for h in history if math.isfinite(h["val_nll"])]
    return min(vals)[1] if vals else math.nan


def _default_data_fn() -> Callable[[str, str], Any]:
    try:
        from .data import load
    except ImportError as err:  # pragma: no cover - depends on the data module being present
        raise ImportError(
            "train_or_load needs data: pass data_fn=lambda name, split: tensor, or install flowlib.data"
        ) from err
    return load


@contextlib.contextmanager
def training_lock(directory: Path):
    """Hold ``<directory>/.lock`` exclusively (POSIX ``flock``), so that two processes asking for the same
    configuration at once (``python -m flowlib.run --jobs 2``, two notebooks open side by side) train it
    once: the second waits, then finds the finished checkpoint. The lock goes with the process, so a killed
    run never leaves it held. Where ``fcntl`` does not exist (Windows) there is no lock."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(directory / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is training {directory.name} ...", file=sys.stderr,
                  flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train_or_load(config: TrainConfig, data_fn: Callable[[str, str], Any] | None = None,
                  checkpoint_root: str | os.PathLike = "checkpoints", progress: bool = True,
                  which: str = "best") -> tuple[nn.Module, list[dict]]:
    """The model of ``config``, trained once and cached in ``<checkpoint_root>/<name>-<hash>/``.

    A finished run is loaded (no data needed); a partial one is resumed; otherwise the model is built
    (``torch.manual_seed(config.seed)``, shape from the data) and trained. ``data_fn(name, split)``
    returns the ``"train"`` and ``"val"`` splits (default: :func:`flowlib.data.load`). A distilled config
    trains or loads ``config.teacher`` first, under the same root. A stored config that differs from
    ``config`` is refused, naming the differing keys. Returns ``(model, history)``; the model holds the
    ``which="best"`` (lowest validation NLL) or ``"last"`` weights and is in eval mode. Training holds
    :func:`training_lock`, so concurrent callers with the same config train it once.
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    directory = _run_directory(config, checkpoint_root)
    found = _load_finished(config, directory, which)
    if found is not None:
        return found
    with training_lock(directory):
        found = _load_finished(config, directory, which)  # another process may have trained it meanwhile
        if found is not None:
            return found
        return _train_new(config, data_fn, checkpoint_root, progress, which, directory)


def is_trained(config: TrainConfig, checkpoint_root: str | os.PathLike = "checkpoints") -> bool:
    """Whether ``config``'s run has finished under ``checkpoint_root`` (so :func:`train_or_load` loads it
    instead of training). A results notebook uses it to draw what exists without training anything."""
    last = _run_directory(config, checkpoint_root) / "last.pt"
    return last.exists() and _finished_for(load_checkpoint(last), config)


def _run_directory(config: TrainConfig, checkpoint_root: str | os.PathLike) -> Path:
    """``<checkpoint_root>/<name>-<hash>``: where ``config``'s run lives."""
    return Path(checkpoint_root) / f"{config.name}-{config_hash(config)}"


def rehash_checkpoints(checkpoint_root: str | os.PathLike = "checkpoints", pattern: str = "*") -> list[tuple]:
    """Rename the run directories under ``checkpoint_root`` (those matching ``pattern``) to the name their
    stored config has under the current :func:`config_hash`, so runs cached by an earlier version of
    flowlib (whose hash kept ``steps`` for early-stopped runs) load instead of training again. A directory
    whose new name is taken is left alone. Returns the ``(old, new)`` names renamed."""
    renamed = []
    for directory in sorted(Path(checkpoint_root).glob(pattern)):
        last = directory / "last.pt"
        if not last.is_file():
            continue
        config = TrainConfig.from_dict(load_checkpoint(last)["config"])
        target = _run_directory(config, directory.parent)
        if target != directory and not target.exists():
            directory.rename(target)
            renamed.append((directory.name, target.name))
    return renamed


def _finish(config: TrainConfig, directory: Path, which: str, model: nn.Module, history: list[dict]):
    device = resolve_device(config.device)
    path = directory / ("best.pt" if which == "best" and (directory / "best.pt").exists() else "last.pt")
    model.load_state_dict(load_checkpoint(path, map_location=device)["model"])
    return model.to(device).eval(), history


def _load_finished(config: TrainConfig, directory: Path, which: str):
    """``(model, history)`` of a finished run in ``directory``, else None (a stored config that differs is
    an error)."""
    last_path = directory / "last.pt"
    if not last_path.exists():
        return None
    ck = load_checkpoint(last_path)
    _check_same_config(ck["config"], config, last_path)
    _check_within_cap(ck, config, last_path)
    if not _finished_for(ck, config):
        return None
    model = build_model(config.arch, tuple(ck["input_shape"]), **config.model_kwargs)
    return _finish(config, directory, which, model, list(ck["history"]))


def _train_new(config: TrainConfig, data_fn, checkpoint_root, progress: bool, which: str, directory: Path,
               distributed=None):
    """Train (or resume) ``config`` into ``directory``; the caller holds its :func:`training_lock`, or is one
    rank of ``distributed`` (:mod:`flowlib.train_ddp`), whose teacher must be trained already."""
    if config.dataset is None:
        raise ValueError("config.dataset is not set: name the dataset data_fn should load")
    data_fn = data_fn or _default_data_fn()
    train_x = _as_tensor(data_fn(config.dataset, "train"), f"data_fn({config.dataset!r}, 'train')")
    val_x = data_fn(config.dataset, "val")
    teacher = None
    if config.distilled:
        if config.teacher is None:
            raise ValueError(f"config {config.name!r} uses method {config.method!r}, which needs "
                             f"config.teacher (the teacher's TrainConfig)")
        if distributed is not None and not is_trained(config.teacher, checkpoint_root):
            # every rank would train it at once: one process trains teachers, before the ranks start
            raise FileNotFoundError(f"{config.name}: its teacher is not trained under {checkpoint_root}; "
                                    f"train it first (train_or_load, or flowlib.train_ddp on its config)")
        teacher, _ = train_or_load(config.teacher, data_fn, checkpoint_root, progress, which="best")
    torch.manual_seed(config.seed)
    model = build_model(config.arch, tuple(train_x.shape[1:]), **config.model_kwargs)
    history = train(model, train_x, val_x, config, teacher=teacher, checkpoint_dir=directory,
                    progress=progress, distributed=distributed)
    if distributed is not None:
        distributed.barrier()  # rank 0's last checkpoint is on disk before any rank reads it
    return _finish(config, directory, which, model, history)
