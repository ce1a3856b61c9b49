"""Autograder checks for the exercises in the notebooks (coursework with nbgrader; README, "Teaching with
flowlib").

Each exercise asks a student to write one function that flowlib already implements. Its ``check_*``
function here runs the student's function on seeded random inputs, measures how far it is from flowlib's
own implementation (and, where there is one, from an independent reference: the autograd Jacobian, a
closed-form density, the exact gradient), and raises ``AssertionError`` naming the first check that fails
and by how much. On success it returns the measured errors, which the notebook shows. nbgrader gives a
graded cell its points when the cell runs without an error, so a check that raises is a lost exercise.

Everything runs in float64 on small models: each check takes well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from flowlib import bijectors as B
from flowlib.checks import jacobian_logdet, perturb
from flowlib.distill import default_pairs, ilkd_loss, lkd_loss, skd_loss
from flowlib.interpolate import interpolate_pairs
from flowlib.models import MAF, Glow
from flowlib.selfnorm import SelfNormLinear

__all__ = [
    "EXERCISES", "check_affine_coupling", "check_affine_log_density", "check_ilkd_loss", "check_lkd_loss",
    "check_made_masks", "check_norm_preserving_interpolation", "check_selfnorm_gradient", "check_skd_loss",
    "coupling_conditioner",
]

TOL = 1e-8

# notebook -> the exercises it holds (the grade_id of each check cell and its points); the course builder
# (flowlib.course) and the tests read this table
EXERCISES: dict[str, dict[str, int]] = {
    "01_change_of_variables": {"check_affine_log_density": 2},
    "02_bijectors_and_models": {"check_affine_coupling": 3, "check_made_masks": 2},
    "05_lkd": {"check_lkd_loss": 2},
    "06_ilkd": {"check_ilkd_loss": 3},
    "07_skd_and_combined": {"check_skd_loss": 2},
    "08_evaluation": {"check_norm_preserving_interpolation": 2},
    "09_self_normalizing_flows": {"check_selfnorm_gradient": 3},
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(name: str, got, want: torch.Tensor, tol: float = TOL) -> float:
    """``max |got - want|``; ``AssertionError`` naming ``name`` if the shapes differ or the error exceeds
    ``tol``."""
    if not torch.is_tensor(got):
        raise AssertionError(f"{name}: expected a tensor, got {type(got).__name__}")
    got = got.detach()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    err = float((got.to(want.dtype) - want.detach()).abs().max()) if want.numel() else 0.0
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{name}: off by {err:.3g} (allowed {tol:.0e})")
    return err


def _call(name: str, fn: Callable, *args):
    try:
        return fn(*args)
    except NotImplementedError:
        raise AssertionError(f"{name} is not implemented yet (it raises NotImplementedError)") from None
    except Exception as error:  # a wrong answer that crashes is reported like one that computes wrongly
        raise AssertionError(f"{name} raised {type(error).__name__}: {error}") from error


# --------------------------------------------------------------------------------------------------
# 01 · change of variables
# --------------------------------------------------------------------------------------------------

def check_affine_log_density(affine_log_density: Callable, seed: int = 0) -> dict:
    """Exercise (notebook 01, Eq. 1): ``affine_log_density(x, A, b)`` is ``log p_x(x)`` for
    ``x = A z + b``, ``z ~ N(0, I_D)``, one value per row of ``x`` (N, D).

    Checked against the closed form: ``x`` is Gaussian with mean ``b`` and covariance ``A A^T``."""
    g = _gen(seed)
    errors = {}
    for d in (1, 3, 5):
        a = torch.randn(d, d, generator=g, dtype=torch.float64) + 2 * torch.eye(d, dtype=torch.float64)
        if d == 3:
            a[0] = -a[0]  # a reflection: |det A| differs from det A
        b = torch.randn(d, generator=g, dtype=torch.float64)
        x = b + torch.randn(7, d, generator=g, dtype=torch.float64) @ a.T
        want = torch.distributions.MultivariateNormal(b, covariance_matrix=a @ a.T).log_prob(x)
        errors[f"D={d}"] = _close(f"affine_log_density at D = {d}", _call("affine_log_density",
                                                                          affine_log_density, x, a, b), want)
    return errors


# --------------------------------------------------------------------------------------------------
# 02 · an affine coupling layer and MADE's masks
# --------------------------------------------------------------------------------------------------

def coupling_conditioner(layer: B.AffineCoupling) -> Callable:
    """The conditioner of a flowlib :class:`~flowlib.bijectors.AffineCoupling` as the exercise uses it: a
    function of the first half ``x_a`` returning ``(shift, log_scale)`` for the second half."""
    return layer._scale_shift


def check_affine_coupling(encode: Callable, decode: Callable, seed: int = 0) -> dict:
    """Exercise (notebook 02, GLOW's affine coupling): ``encode(x, net) -> (y, logdet)`` and
    ``decode(y, net) -> x`` for (N, D) data, where ``net(x_a)`` returns ``(shift, log_scale)``, ``x_a`` is
    the first ``D // 2`` features, and ``y_b = (x_b + shift) * exp(log_scale)``.

    Checked: ``encode`` against flowlib's layer (output and log-det), the log-det against the autograd
    Jacobian, and ``decode(encode(x)) == x``."""
    torch.manual_seed(seed)
    layer = perturb(B.AffineCoupling(6, hidden=16).double(), scale=0.5, seed=seed)
    net = coupling_conditioner(layer)
    x = torch.randn(5, 6, generator=_gen(seed), dtype=torch.float64)
    out = _call("encode", encode, x, net)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise AssertionError("encode should return a pair (y, logdet)")
    y, logdet = out
    with torch.no_grad():
        y_ref, logdet_ref = layer(x)
    errors = {"encode y vs flowlib": _close("encode's y", y, y_ref),
              "log-det vs flowlib": _close("encode's logdet", logdet, logdet_ref)}
    jac = _call("encode", jacobian_logdet, lambda v: encode(v, net)[0], x)
    errors["log-det vs autograd Jacobian"] = _close("encode's logdet against the autograd Jacobian",
                                                    logdet, jac)
    errors["decode(encode(x)) - x"] = _close("decode(encode(x))", _call("decode", decode, y_ref, net), x)
    return errors


def check_made_masks(made_masks: Callable, seed: int = 0) -> dict:
    """Exercise (notebook 02, MADE): ``made_masks(input_degrees, hidden_degrees)`` returns the 0/1 masks
    of every layer, ``[M_1, ..., M_L, M_out]``, each shaped (units out, units in).

    ``input_degrees`` are ``1..D``; ``hidden_degrees`` is a list of 1-D tensors, one per hidden layer.
    Checked: equal to the masks of flowlib's :class:`~flowlib.bijectors.MADE` for its degrees, and a network
    built with them is autoregressive (output ``i`` depends on exactly the inputs ``< i`` it may use)."""
    d, hidden, layers = 5, 12, 2
    made = B.MADE(d, hidden=hidden, layers=layers, n_outputs=1)
    deg_in = torch.arange(1, d + 1)
    hidden_degrees = [(torch.arange(hidden) % (d - 1)) + 1 for _ in range(layers)]
    masks = _call("made_masks", made_masks, deg_in, hidden_degrees)
    linears = [m for m in made.net if isinstance(m, B._MaskedLinear)]
    if len(masks) != len(linears):
        raise AssertionError(f"expected {len(linears)} masks (one per hidden layer and the output), "
                             f"got {len(masks)}")
    errors = {}
    for k, (mask, layer) in enumerate(zip(masks, linears)):
        name = "output mask" if k == len(linears) - 1 else f"hidden mask {k + 1}"
        errors[name] = _close(name, torch.as_tensor(mask).double(), layer.mask.double(), tol=0.0)
    # a masked MLP from the student's masks: d out_i / d x_j must be non-zero exactly when j < i
    g = _gen(seed)
    weights = [torch.randn(m.shape, generator=g, dtype=torch.float64) * torch.as_tensor(m).double()
               for m in masks]

    def net(x):
        for w in weights[:-1]:
            x = torch.tanh(x @ w.T)
        return x @ weights[-1].T

    point = torch.randn(1, d, generator=g, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(net, point)[0, :, 0]
    allowed = torch.tril(torch.ones(d, d, dtype=torch.bool), -1)
    if bool((jac[~allowed] != 0).any()):
        raise AssertionError("not autoregressive: an output depends on an input at or after its own position")
    errors["autoregressive"] = 0.0
    return errors


# --------------------------------------------------------------------------------------------------
# 05-07 · the distillation losses
# --------------------------------------------------------------------------------------------------

def _tabular_pair(arch: str, seed: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A small perturbed teacher (6 points) and student (3 points) on 6-D data, in float64 eval mode."""
    torch.manual_seed(seed)
    if arch == "maf":
        teacher, student = MAF(6, depth=6, hidden=16), MAF(6, depth=3, hidden=8)
    else:
        teacher, student = Glow((6,), depth=6, hidden=16), Glow((6,), depth=3, hidden=8)
    teacher, student = (perturb(m.double().eval(), scale=0.1, seed=seed + k) for k, m in
                        enumerate((teacher, student)))
    x = torch.randn(16, 6, generator=_gen(seed), dtype=torch.float64)
    return teacher, student, x


def _gradients_reach(name: str, loss: torch.Tensor, teacher: nn.Module, student: nn.Module) -> None:
    """Backpropagate ``loss``: the student's parameters must get a gradient, the teacher's none."""
    for p in (*teacher.parameters(), *student.parameters()):
        p.grad = None
    if not loss.requires_grad:
        raise AssertionError(f"{name}: the loss carries no gradient to the student")
    loss.backward()
    if any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in teacher.parameters()):
        raise AssertionError(f"{name}: the teacher receives a gradient; it is frozen (torch.no_grad())")
    if not any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in student.parameters()):
        raise AssertionError(f"{name}: no gradient reaches the student's parameters")


def check_lkd_loss(my_lkd_loss: Callable, seed: int = 0) -> dict:
    """Exercise (notebook 05, Eq. 12): ``my_lkd_loss(teacher, student, x)`` is the mean squared difference
    between the student's and the teacher's full latents, the teacher frozen. Checked against
    :func:`flowlib.distill.lkd_loss` on a GLOW and a MAF pair, and where the gradients go."""
    errors = {}
    for arch in ("glow", "maf"):
        teacher, student, x = _tabular_pair(arch, seed)
        loss = _call("my_lkd_loss", my_lkd_loss, teacher, student, x)
        errors[arch] = _close(f"my_lkd_loss ({arch})", torch.as_tensor(loss), lkd_loss(teacher, student, x))
        _gradients_reach(f"my_lkd_loss ({arch})", loss, teacher, student)
    return errors


def check_ilkd_loss(my_ilkd_loss: Callable, seed: int = 0) -> dict:
    """Exercise (notebook 06, Eq. 13 with the official averaging): ``my_ilkd_loss(teacher, student, x,
    pairs)`` is the mean over ``pairs`` of the mean squared difference between student point ``j`` and
    teacher point ``i`` of ``enc.latents``, each pair ``(j, i) = (student_index, teacher_index)``.

    Checked against :func:`flowlib.distill.ilkd_loss` with the default pairs and with uneven ones (so that a
    swapped pair, or a sum instead of a mean, shows), and where the gradients go."""
    errors = {}
    for arch in ("maf", "glow"):
        teacher, student, x = _tabular_pair(arch, seed)
        for label, pairs in (("default pairs", default_pairs(teacher, student)),
                             ("pairs (0, 4), (2, 1)", [(0, 4), (2, 1)])):
            name = f"my_ilkd_loss ({arch}, {label})"
            loss = _call("my_ilkd_loss", my_ilkd_loss, teacher, student, x, pairs)
            errors[f"{arch}, {label}"] = _close(name, torch.as_tensor(loss),
                                                ilkd_loss(teacher, student, x, pairs=pairs))
        _gradients_reach(f"my_ilkd_loss ({arch})", loss, teacher, student)
    return errors


def check_skd_loss(my_skd_loss: Callable, seed: int = 0) -> dict:
    """Exercise (notebook 07, Eq. 14 for a tabular flow): ``my_skd_loss(teacher, student, noise)`` decodes
    the same noise (N, D) with both models and returns the mean absolute difference of the samples, the
    teacher frozen. Checked against :func:`flowlib.distill.skd_loss` (its official mode: tabular SKD
    decodes the shared noise at T = 1, with the L1 distance)."""
    errors = {}
    for arch in ("glow", "maf"):
        teacher, student, _ = _tabular_pair(arch, seed)
        noise = torch.randn(16, 6, generator=_gen(seed + 1), dtype=torch.float64)
        loss = _call("my_skd_loss", my_skd_loss, teacher, student, noise)
        errors[arch] = _close(f"my_skd_loss ({arch})", torch.as_tensor(loss),
                              skd_loss(teacher, student, noise=noise))
        _gradients_reach(f"my_skd_loss ({arch})", loss, teacher, student)
    return errors


# --------------------------------------------------------------------------------------------------
# 08 · interpolation; 09 · the self-normalizing gradient
# --------------------------------------------------------------------------------------------------

def check_norm_preserving_interpolation(interpolate: Callable, seed: int = 0) -> dict:
    """Exercise (notebook 08, Eq. 16): ``interpolate(u, v, alpha)`` mixes two batches of latents (N, ...)
    linearly and rescales each sample's mixture to the norm ``(1 - alpha) ||u|| + alpha ||v||``. Checked
    against :func:`flowlib.interpolate.interpolate_pairs` on image-shaped latents at several ``alpha``."""
    g = _gen(seed)
    u = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    v = 3 * torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    errors = {}
    for alpha in (0.0, 0.25, 0.5, 1.0):
        errors[f"alpha={alpha}"] = _close(f"interpolate at alpha = {alpha}",
                                          _call("interpolate", interpolate, u, v, alpha),
                                          interpolate_pairs(u, v, alpha))
    return errors


def _gaussian_nll(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z.pow(2).sum(1) + 0.5 * z.shape[1] * math.log(2 * math.pi)


def check_selfnorm_gradient(selfnorm_gradient: Callable, seed: int = 0) -> dict:
    """Exercise (notebook 09, Keller et al.'s Self Normalizing Flows): ``selfnorm_gradient(W, R, x)`` is the
    gradient with respect to ``W`` of the mean negative log-likelihood of ``z = W x`` under N(0, I), with
    the gradient of ``log|det W|`` replaced by the learned inverse's ``R^T``.

    Checked: with ``R = W^-1`` it is the exact gradient (autograd through ``slogdet``); with ``R`` a rough
    inverse it is what flowlib's one-sided :class:`~flowlib.selfnorm.SelfNormLinear` gives ``W``."""
    torch.manual_seed(seed)
    d = 6
    g = _gen(seed)
    w = torch.eye(d, dtype=torch.float64) + 0.4 * torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(32, d, generator=g, dtype=torch.float64)
    exact_w = w.clone().requires_grad_(True)
    (_gaussian_nll(x @ exact_w.T) - torch.linalg.slogdet(exact_w)[1]).mean().backward()
    errors = {"R = W^-1 vs exact gradient": _close(
        "selfnorm_gradient with R = W^-1 (should equal the exact gradient)",
        _call("selfnorm_gradient", selfnorm_gradient, w, torch.linalg.inv(w), x), exact_w.grad)}
    layer = SelfNormLinear(d, likelihood_grad="forward").double().train()
    rough = torch.linalg.inv(w) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.inverse_weight.copy_(rough)
    z, logdet = layer(x)
    (_gaussian_nll(z) - logdet).mean().backward()
    errors["rough R vs SelfNormLinear"] = _close(
        "selfnorm_gradient with a rough R (should use R^T, not W^-T)",
        _call("selfnorm_gradient", selfnorm_gradient, w, rough, x), layer.weight.grad)
    return errors
