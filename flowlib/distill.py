"""Likelihood metrics and the knowledge-distillation losses of *Distilling Normalizing Flows*.

Paper map (section 3):

* :func:`nll`, :func:`bits_per_dim` -- the likelihood term ``log p_s(x)`` of Eq. 15 and the image metric.
* :func:`lkd_loss` -- Eq. 12, latent knowledge distillation: distance between the final latents.
* :func:`ilkd_loss` -- Eq. 13, intermediate latent KD: sum of distances at matched points
  (:func:`default_pairs`).
* :func:`skd_loss` -- Eq. 14, synthesized KD: distance between the samples both models decode from the
  *same* noise.
* :func:`distillation_loss` -- Eq. 15, ``l0 * NLL_s(x) + l1 * (I)LKD + l2 * SKD``, with the settings of
  section 4.2 in :data:`PRESETS`.

The paper measures every distance with L1 (mean absolute error); the official code used MSE, so
``distance="mse"`` is offered too. The teacher is frozen (:func:`freeze`): its passes run under
``torch.no_grad()``, so no gradient ever reaches it and it is never updated. Losses refuse a teacher in
training mode, because a training-mode pass would change it (MAF batch-norm statistics, GLOW ActNorm
initialisation).

Pairs of distillation points are written ``(student_index, teacher_index)`` into ``enc.latents``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import MAF, Encoding, Glow, check_count, check_temperature, standard_normal_logprob

__all__ = [
    "DISTANCES", "DistillationLoss", "PRESETS", "Preset", "bits_per_dim", "bits_per_dim_from_log_prob",
    "default_pairs", "distillation_loss", "freeze", "ilkd_loss", "latent_distance", "lkd_loss", "nll",
    "resolve_method", "skd_loss",
]

DISTANCES = ("l1", "mse")


# --------------------------------------------------------------------------------------------------
# Likelihood
# --------------------------------------------------------------------------------------------------

def nll(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood in nats per sample, ``-mean_i log p(x_i)`` (Eq. 1-3).

    As a loss this is the first term of Eq. 15 (the paper writes ``l0 * log p_s(x)``; minimising the
    loss means maximising the log-likelihood, so the term is its negative).
    """
    return -model.log_prob(x).mean()


def bits_per_dim_from_log_prob(log_prob: torch.Tensor, y: torch.Tensor, preprocess: nn.Module | None = None,
                               bins: int = 256) -> torch.Tensor:
    """Per-sample bits/dim from per-sample model log-densities ``log_prob`` of model-space data ``y``.

    With an image ``preprocess`` (``y = preprocess(dequantize(x_int))``, :class:`flowlib.bijectors.
    ImagePreprocess`), the density of the dequantised integer data ``x_int + u`` on ``[0, bins)^D`` is

        log p(x_int + u) = log p_model(y) + log|dy/dx01| - D log(bins),

    where ``x01 = (x_int + u) / bins``; ``log|dy/dx01|`` is minus the log-det that
    ``preprocess.inverse(y)`` returns. Bits/dim is ``-log p(x_int + u) / (D ln 2)``. With
    ``preprocess=None`` (continuous tabular data) it is ``-log p_model(y) / (D ln 2)`` and ``bins`` is
    not used.
    """
    d = y[0].numel()
    log_p = log_prob
    if preprocess is not None:
        _, inv_logdet = preprocess.inverse(y)
        log_p = log_p - inv_logdet - d * math.log(bins)
    return -log_p / (d * math.log(2.0))


def bits_per_dim(model: nn.Module, y: torch.Tensor, preprocess: nn.Module | None = None,
                 bins: int = 256) -> torch.Tensor:
    """Mean bits per dimension of model-space data ``y`` (see :func:`bits_per_dim_from_log_prob`).

    ``y`` is what the model sees: for images ``y = preprocess(dequantize(x_int, bins))``; pass the same
    ``preprocess`` here so that its Jacobian and the dequantisation constant ``D log(bins)`` are counted
    (GLOW's ``x - 0.5`` preprocessing gives ``nll / (D ln 2) + log2(bins)``). Does not change the
    model's train/eval mode; wrap in ``torch.no_grad()`` for evaluation.
    """
    return bits_per_dim_from_log_prob(model.log_prob(y), y, preprocess, bins).mean()


# --------------------------------------------------------------------------------------------------
# Distances, freezing, pairing
# --------------------------------------------------------------------------------------------------

def latent_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "l1") -> torch.Tensor:
    """The distance ``L_r`` of Eq. 12-14: ``"l1"`` mean absolute error (the paper's choice) or
    ``"mse"`` mean squared error (the official code's choice), averaged over every element."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    if a.shape != b.shape:
        raise ValueError(f"cannot compare tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    diff = a - b
    return diff.abs().mean() if distance == "l1" else diff.pow(2).mean()


def freeze(teacher: nn.Module) -> nn.Module:
    """Freeze a teacher for distillation: eval mode and ``requires_grad=False`` on every parameter.

    Eval mode makes MAF's batch norm use its running statistics (and stop updating them) and keeps
    GLOW's ActNorm from re-initialising. Returns the same module.
    """
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _check_teacher(teacher: nn.Module) -> None:
    if teacher is None:
        raise ValueError("this distillation loss needs a teacher model, got None")
    if teacher.training:
        raise RuntimeError(
            "the teacher is in training mode, so a forward pass would change it (batch-norm statistics, "
            "ActNorm initialisation); call flowlib.distill.freeze(teacher) first"
        )


def _num_points(model: nn.Module, role: str) -> int:
    if isinstance(model, Glow):
        return model.levels if model.image else model.depth
    if isinstance(model, MAF):
        return model.depth
    raise TypeError(
        f"default_pairs knows Glow and MAF, got a {type(model).__name__} {role}; pass pairs=[(student_index, "
        f"teacher_index), ...] explicitly"
    )


def default_pairs(teacher: nn.Module, student: nn.Module) -> list[tuple[int, int]]:
    """Default ILKD matching (Eq. 13) as ``(student_index, teacher_index)`` pairs into ``enc.latents``.

    * Image GLOW (same number of levels, paper section 4.1): level ``l`` of the student with level ``l``
      of the teacher, the representation at every split point (section 3.2: "we distill this knowledge
      at each split level"). The last level's output is the top-level latent.
    * MAF and tabular GLOW (one latent per block / step): with ``K_t`` teacher and ``K_s <= K_t``
      student points, student point ``j`` is matched with teacher point
      ``round((j + 1) * K_t / K_s) - 1`` (halves rounded up), the end of the group of teacher steps it
      replaces (section 3.2: two teacher steps distilled into one student step). K_t = 6, K_s = 3 gives
      (0, 1), (1, 3), (2, 5); K_t = 9, K_s = 3 gives (0, 2), (1, 5), (2, 8). The official code matches
      block ``j`` with teacher block ``3 j`` instead; ours ends on the final latent.

    In both cases the last pair is the final latent, so ILKD already contains the LKD term (Eq. 15:
    "the final latent step is just another intermediate step"); it is counted once.
    """
    t_image = isinstance(teacher, Glow) and teacher.image
    s_image = isinstance(student, Glow) and student.image
    k_t, k_s = _num_points(teacher, "teacher"), _num_points(student, "student")
    if t_image or s_image:
        if not (t_image and s_image):
            raise ValueError("default ILKD pairing needs both models to be image GLOWs or both tabular; "
                             "pass pairs explicitly")
        if k_t != k_s:
            raise ValueError(
                f"teacher has {k_t} levels and student {k_s}; ILKD pairs GLOW levels one to one (teacher and "
                f"student share the number of levels, paper section 4.1); pass pairs explicitly"
            )
        return [(lvl, lvl) for lvl in range(k_s)]
    if k_s > k_t:
        raise ValueError(
            f"the student has more distillation points ({k_s}) than the teacher ({k_t}); the default "
            f"pairing assumes a smaller student: pass pairs=[(student_index, teacher_index), ...] explicitly"
        )
    return [(j, math.floor((j + 1) * k_t / k_s + 0.5) - 1) for j in range(k_s)]


# --------------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------------

def _encode_teacher(teacher: nn.Module, x: torch.Tensor) -> Encoding:
    _check_teacher(teacher)
    with torch.no_grad():
        return teacher.encode(x)


def _lkd_from(t_enc: Encoding, s_enc: Encoding, distance: str) -> torch.Tensor:
    t, s = t_enc.flat(), s_enc.flat()
    if t.shape != s.shape:
        raise ValueError(
            f"LKD needs latents of the same size: teacher {tuple(t.shape)}, student {tuple(s.shape)}"
        )
    return latent_distance(s, t, distance)


def _known_points(model: nn.Module) -> int | None:
    """Number of ``enc.latents`` of a Glow or MAF (None for other models: known only after encoding)."""
    try:
        return _num_points(model, "model")
    except TypeError:
        return None


def _check_pairs(pairs: Sequence[Sequence[int]], n_student: int | None, n_teacher: int | None) -> None:
    """ILKD pairs: at least one, each ``(student_index, teacher_index)`` within the points (when known).
    Checked before the models run, so that a bad pair cannot follow a training-mode pass of the student."""
    if len(pairs) == 0:
        raise ValueError("ILKD needs at least one (student_index, teacher_index) pair")
    for k, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"ILKD pair #{k} should be (student_index, teacher_index), got {pair!r}")
        j, i = int(pair[0]), int(pair[1])
        if n_student is None or n_teacher is None:
            continue
        if not (0 <= j < n_student) or not (0 <= i < n_teacher):
            raise IndexError(
                f"ILKD pair #{k} (student {j}, teacher {i}) is out of range: the student has "
                f"{n_student} distillation points and the teacher {n_teacher}"
            )


def _ilkd_from(t_enc: Encoding, s_enc: Encoding, pairs: Sequence[Sequence[int]],
               distance: str) -> torch.Tensor:
    _check_pairs(pairs, len(s_enc.latents), len(t_enc.latents))
    total = None
    for k, pair in enumerate(pairs):
        j, i = int(pair[0]), int(pair[1])
        s_lat, t_lat = s_enc.latents[j], t_enc.latents[i]
        if s_lat.shape != t_lat.shape:
            raise ValueError(
                f"ILKD pair #{k} (student point {j}, teacher point {i}) has mismatched shapes: student "
                f"{tuple(s_lat.shape)}, teacher {tuple(t_lat.shape)}; pair points of equal shape"
            )
        term = latent_distance(s_lat, t_lat, distance)
        total = term if total is None else total + term
    return total


def lkd_loss(teacher: nn.Module, student: nn.Module, x: torch.Tensor, distance: str = "l1") -> torch.Tensor:
    """Latent knowledge distillation, Eq. 12: ``L_r(t(x), s(x))`` between the full latents.

    ``t(x)`` and ``s(x)`` are ``enc.flat()``: every latent variable of the sample (all GLOW levels),
    each standard normal under its model. The teacher pass runs under ``no_grad``.
    """
    t_enc = _encode_teacher(teacher, x)
    return _lkd_from(t_enc, student.encode(x), distance)


def ilkd_loss(teacher: nn.Module, student: nn.Module, x: torch.Tensor,
              pairs: Sequence[Sequence[int]] | None = None, distance: str = "l1") -> torch.Tensor:
    """Intermediate latent knowledge distillation, Eq. 13: ``sum_i L_r(t_i(x), s_i(x))``.

    ``pairs`` lists ``(student_index, teacher_index)`` into ``enc.latents`` (default:
    :func:`default_pairs`, whose last pair is the final latent). Each term is a mean over the elements
    of that point; the terms are summed. A pair of points with different shapes is an error naming it.
    """
    if pairs is None:
        pairs = default_pairs(teacher, student)
    _check_pairs(pairs, _known_points(student), _known_points(teacher))
    t_enc = _encode_teacher(teacher, x)
    return _ilkd_from(t_enc, student.encode(x), pairs, distance)


def _check_same_latents(teacher, student):
    if [tuple(s) for s in teacher.latent_shapes] != [tuple(s) for s in student.latent_shapes]:
        raise ValueError(
            f"SKD decodes the same noise with both models, but their latent shapes differ: teacher "
            f"{teacher.latent_shapes}, student {student.latent_shapes}"
        )


def _shared_noise(teacher, student, n, noise, generator):
    _check_same_latents(teacher, student)
    if noise is None:
        if n is None:
            raise ValueError("skd_loss needs the number of samples n (or noise)")
        noise = teacher.sample_noise(check_count(n, "the number of SKD samples n", minimum=1), generator)
    elif isinstance(noise, torch.Tensor):
        noise = teacher._as_latent_list(noise)
    return list(noise)


def _skd_from(teacher, student, noise, temperature, distance):
    with torch.no_grad():
        x_t = teacher.sample(temperature=temperature, noise=noise)
    x_s = student.sample(temperature=temperature, noise=noise)
    return latent_distance(x_s, x_t, distance)


def skd_loss(teacher: nn.Module, student: nn.Module, n: int | None = None, temperature: float = 0.7,
             noise=None, generator: torch.Generator | None = None, distance: str = "l1") -> torch.Tensor:
    """Synthesized knowledge distillation, Eq. 14: ``L_r(t^{-1}(z), s^{-1}(z))``.

    One list of standard-normal noise tensors (every GLOW level, drawn once with
    ``teacher.sample_noise(n, generator)`` unless ``noise`` is given) is decoded by both models at
    ``temperature`` (0.7, the paper's sampling temperature), so teacher and student synthesise from the
    same ``z``. The teacher decode runs under ``no_grad``; gradients flow through the student's decode.
    ``n`` must be >= 1 and ``temperature`` a finite number >= 0 (``ValueError``).
    """
    check_temperature(temperature)
    _check_teacher(teacher)
    noise = _shared_noise(teacher, student, n, noise, generator)
    return _skd_from(teacher, student, noise, temperature, distance)


# --------------------------------------------------------------------------------------------------
# Eq. 15 and the paper's settings
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """Weights ``(l0, l1, l2)`` of Eq. 15 and the latent term ``l1`` multiplies (``"lkd"``/``"ilkd"``)."""

    lambdas: tuple[float, float, float]
    latent: str | None
    note: str = ""


# Section 4.2 of the paper. Edit a preset here, or pass ``lambdas=`` to distillation_loss / TrainConfig.
PRESETS: dict[str, Preset] = {
    # No distillation: the plain student (and the teacher) minimise the NLL only.
    "student": Preset((1.0, 0.0, 0.0), None, "no distillation"),
    # The paper prints l0 = 1, l1 = l2 = 0 for its LKD rows, which is no distillation at all and cannot be
    # what produced LKD numbers different from the plain student. We read it as the ILKD weights applied
    # to the final latent only (Eq. 12), so that the LKD and ILKD rows differ only in the matched points.
    # The other plausible reading is (1.0, 0.1, 0.0).
    "lkd": Preset((0.9, 0.1, 0.0), "lkd", "paper prints (1, 0, 0); ILKD's weights on the final latent"),
    "ilkd": Preset((0.9, 0.1, 0.0), "ilkd", "section 4.2"),
    # SKD is used together with the latent term (Eq. 15 writes l1 * (I)LKD): our SKD preset uses ILKD with
    # the default pairing (which includes the final latent).
    "skd": Preset((0.85, 0.075, 0.075), "ilkd", "section 4.2; l1 multiplies ILKD"),
}

_METHOD_ALIASES = {"nll": "student"}


def resolve_method(method: str) -> str:
    """Canonical preset name for ``method`` (``"nll"`` is an alias of ``"student"``)."""
    name = _METHOD_ALIASES.get(method, method)
    if name not in PRESETS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of "
                         f"{', '.join(sorted(set(PRESETS) | set(_METHOD_ALIASES)))}")
    return name


@dataclass
class DistillationLoss:
    """Result of :func:`distillation_loss`: the ``total`` of Eq. 15 and each unweighted term.

    ``terms`` holds ``"nll"`` and, when their weight is non-zero, ``"lkd"`` or ``"ilkd"`` and ``"skd"``.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    lambdas: tuple[float, float, float] = (1.0, 0.0, 0.0)

    def items(self) -> dict[str, float]:
        """Plain floats for logging: ``loss`` and every term."""
        out = {"loss": float(self.total.detach())}
        out.update({k: float(v.detach()) for k, v in self.terms.items()})
        return out


def distillation_loss(teacher: nn.Module | None, student: nn.Module, x: torch.Tensor, method: str = "ilkd",
                      lambdas: Sequence[float] | None = None, pairs=None, distance: str = "l1",
                      temperature: float = 0.7, n_samples: int | None = None, noise=None,
                      generator: torch.Generator | None = None) -> DistillationLoss:
    """Flow distillation, Eq. 15: ``l0 * NLL_s(x) + l1 * (I)LKD(t, s, x) + l2 * SKD(t, s, z)``.

    ``method`` names a :data:`PRESETS` entry (``"student"``/``"nll"``, ``"lkd"``, ``"ilkd"``, ``"skd"``),
    which fixes the latent term (final latent or matched intermediate points) and the default
    ``lambdas``; pass ``lambdas=(l0, l1, l2)`` to override the weights. The NLL is nats per sample
    (Eq. 15's ``log p_s(x)`` negated, as a loss). The student is encoded once (its NLL and latents come
    from the same pass) and the teacher once under ``no_grad``; SKD adds one decode of each model on
    ``n_samples`` (default: the batch size) shared noise samples. Terms with weight 0 are not computed.
    Arguments are checked before any model runs (``ValueError`` for a bad value, ``RuntimeError`` for a
    teacher in training mode), so a refused call changes neither model.
    """
    preset = PRESETS[resolve_method(method)]
    lam = tuple(float(v) for v in (preset.lambdas if lambdas is None else lambdas))
    if len(lam) != 3:
        raise ValueError(f"lambdas must be (l0, l1, l2), got {lambdas!r}")
    if not all(math.isfinite(v) for v in lam):
        raise ValueError(f"lambdas must be finite numbers, got {lambdas!r}")
    latent = preset.latent
    if lam[1] != 0 and latent is None:
        raise ValueError(f"method {method!r} has no latent term; use 'lkd' or 'ilkd' for l1 != 0")
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    needs_teacher = lam[1] != 0 or lam[2] != 0
    if needs_teacher:
        _check_teacher(teacher)
    if lam[1] != 0 and latent == "ilkd":
        if pairs is None:
            pairs = default_pairs(teacher, student)
        _check_pairs(pairs, _known_points(student), _known_points(teacher))
    if lam[2] != 0:
        check_temperature(temperature)
        if n_samples is not None:
            check_count(n_samples, "n_samples", minimum=1)
        _check_same_latents(teacher, student)

    if lam[1] != 0:  # the teacher first: input it refuses must not follow a training pass of the student
        with torch.no_grad():
            t_enc = teacher.encode(x)
    s_enc = student.encode(x)
    terms: dict[str, torch.Tensor] = {"nll": -(standard_normal_logprob(s_enc.z) + s_enc.logdet).mean()}
    total = lam[0] * terms["nll"]
    if lam[1] != 0:
        if latent == "lkd":
            terms["lkd"] = _lkd_from(t_enc, s_enc, distance)
        else:
            terms["ilkd"] = _ilkd_from(t_enc, s_enc, pairs, distance)
        total = total + lam[1] * terms[latent]
    if lam[2] != 0:
        n = x.shape[0] if n_samples is None else n_samples
        shared = _shared_noise(teacher, student, n, noise, generator)
        terms["skd"] = _skd_from(teacher, student, shared, temperature, distance)
        total = total + lam[2] * terms["skd"]
    return DistillationLoss(total, terms, lam)
