"""Self Normalizing Flows (Keller, Peters, Jaini, Hoogeboom, Forre and Welling, ICML 2021).

A linear flow layer ``z = W x`` contributes ``log|det W|`` to the log-likelihood; its gradient
``W^{-T}`` costs O(D^3). The paper keeps a second matrix ``R`` that learns to approximate ``W^{-1}``
through a reconstruction loss and replaces ``W^{-T}`` in the gradient by ``R^T`` (its self
normalizing layers), so a training step costs O(D^2). For a self-normalizing layer, with ``x``
detached,

* gradient of the log-likelihood w.r.t. ``W``: ``delta_z x^T + R^T`` (instead of ``delta_z x^T + W^{-T}``),
* reconstruction loss ``E = lambda * ||x - R W x||^2``, whose gradient reaches both ``R`` and ``W``
  (``dE/dW = 2 lambda R^T (x_hat - x) x^T``, ``dE/dR = 2 lambda (x_hat - x) z^T``).

For a convolution (the paper's self normalizing convolutional layer) the surrogate gradient of
``log|det|`` w.r.t. the kernel ``w`` is ``flip(r) * m``, where ``flip`` swaps the input and output
channels and mirrors the kernel spatially (the kernel of the transposed convolution) and ``m`` counts
how often each kernel entry appears in the matrix of the convolution. With zero padding ("same"),
``m`` at spatial offset ``(dy, dx)`` is ``(H - |dy|) * (W - |dx|)``, and ``flip(r) * m`` is *exactly*
``tr(R_op dJ/dw)`` with ``R_op`` the matrix of the ``r``-convolution: the surrogate is the exact
gradient whenever ``R_op = J^{-1}``.

What the numbers mean
---------------------
* Training mode with gradients enabled (the training step): ``forward`` returns ``y = W x`` and a
  log-det whose **value is 0** (the O(D^3) determinant is skipped) but whose **gradient** w.r.t. ``W``
  is the surrogate above. So ``loss = -model.log_prob(x).mean() + selfnorm_loss(model)`` gives the SNF
  gradient in one ``backward()``, but its *value* is the negative log-likelihood **without** the
  self-normalizing layers' ``log|det W|`` terms, plus the reconstruction penalty: not a likelihood.
  Inside :func:`exact_logdet_values` the value is the exact log-det (computed without gradient, O(D^3)),
  the gradient is unchanged.
* Evaluation mode, or any pass without gradients: the log-det is exact (``slogdet`` of ``W``; for a
  convolution the determinant of the convolution as a linear map, see :class:`SelfNormConv2d`), so
  ``model.eval(); model.log_prob(x)`` is the exact log-density.
* ``inverse`` uses the learned inverse ``R`` (fast, approximate: the paper's sampling) and returns the
  exact ``log|det|`` of the map it applied (that of ``R``; O(D^3) per call, or once per
  :func:`flowlib.bijectors.cached_weights` block); inside :func:`exact_inverse` it solves with ``W``
  instead.

``exact=True`` builds the exact-gradient twin (the paper's "Exact" baselines): the same unconstrained
``W``, no ``R``, the log-det and its gradient through ``slogdet`` (O(D^3)), exact inverse.

Not implemented: the paper's symmetric objective that also trains ``R`` on the likelihood of the
inverse model (``1/2 log p_f + 1/2 log p_g``); here ``R`` is trained by the reconstruction loss only
(``W`` gets the same surrogate gradient either way).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_paths
from .bijectors import ActNorm, _cached_without_grad, cached_weights
from .distill import freeze, latent_distance
from .fused import SelfNormDenseFn
from .models import Encoding, Flow, Glow, standard_normal_logprob

__all__ = [
    "LIKELIHOOD_GRADS",
    "LeakyReLUFlow",
    "SelfNormConv2d",
    "SelfNormFC",
    "SelfNormGlow",
    "SelfNormLinear",
    "adapt_recon_weights",
    "conv_operator",
    "exact_inverse",
    "exact_logdet_values",
    "exact_test_nll",
    "fit",
    "inverse_errors",
    "selfnorm_layers",
    "selfnorm_loss",
]


class _SelfNormLogdet(torch.autograd.Function):
    """A log-det whose value is given and whose gradients are given surrogates.

    ``apply(weight, inverse_weight, grad_w, grad_r, value)`` returns ``value`` (a detached scalar: 0 or the
    exact log-det); backward returns ``grad_output * grad_w`` for ``weight`` and ``grad_output * grad_r`` for
    ``inverse_weight``. ``grad_w`` is the surrogate of ``d log|det W| / dW`` (``R^T`` for a dense layer,
    ``flip(r) * m`` for a convolution) and ``grad_r`` that of ``d log|det W| / dR = -d log|det R| / dR``
    (``-W^T``, ``-flip(w) * m``), each already scaled by the layer's share of the likelihood gradient.
    """

    @staticmethod
    def forward(ctx, weight, inverse_weight, grad_w, grad_r, value):
        ctx.save_for_backward(grad_w, grad_r)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grad_w, grad_r = ctx.saved_tensors
        return grad_output * grad_w, grad_output * grad_r, None, None, None


class _SplitLikelihoodMap(torch.autograd.Function):
    """``z = W x`` (``layer._apply_map(x, W)``) whose likelihood gradient is shared between ``W`` and ``R``
    as in the official self-normalizing layers (Keller et al.'s ``SelfNormConvFunc``).

    With ``dz`` the gradient arriving at ``z`` and ``dx = W^T dz`` the one passed on to ``x`` (unchanged):
    ``W`` gets half of its usual ``dz x^T``, and ``R`` gets half of the gradient it would have if it were
    the flow's parameter, with ``x = R z``: ``-dx z^T``. Both come from autograd on the plain map in the
    backward pass (no hand-written products), so one code serves the dense layer and every convolution.
    """

    @staticmethod
    def forward(ctx, x, weight, inverse_weight, layer):
        z = layer._apply_map(x, weight)
        ctx.save_for_backward(x, weight, inverse_weight, z)
        ctx.layer = layer
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, weight, inverse_weight, z = ctx.saved_tensors
        layer = ctx.layer
        with torch.enable_grad():
            xd, wd = x.detach().requires_grad_(), weight.detach().requires_grad_()
            grad_x, grad_w = torch.autograd.grad(layer._apply_map(xd, wd), (xd, wd), grad_z)
            rd = inverse_weight.detach().requires_grad_()
            (grad_r,) = torch.autograd.grad(layer._apply_map(z.detach(), rd), rd, -grad_x)
        return grad_x, grad_w / 2, grad_r / 2, None


LIKELIHOOD_GRADS = ("split", "forward")


def _orthogonal(n: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().contiguous()  # (QR's q is column-major)


class _SelfNormLayer(nn.Module):
    """Shared machinery of :class:`SelfNormLinear` and :class:`SelfNormConv2d`."""

    features: int

    def __init__(self, features: int, weight: torch.Tensor, exact: bool, recon_weight: float,
                 likelihood_grad: str = "split", sym_recon: bool = False, recon_lr: float = 0.0,
                 recon_alpha: float = 0.9):
        super().__init__()
        if not (isinstance(recon_weight, (int, float)) and math.isfinite(recon_weight) and recon_weight >= 0):
            raise ValueError(f"recon_weight (lambda) must be a finite number >= 0, got {recon_weight}")
        if likelihood_grad not in LIKELIHOOD_GRADS:
            raise ValueError(f"likelihood_grad must be one of {', '.join(LIKELIHOOD_GRADS)}, got "
                             f"{likelihood_grad!r}")
        if not (math.isfinite(recon_lr) and recon_lr >= 0) or not 0 <= recon_alpha < 1:
            raise ValueError(f"need recon_lr >= 0 and 0 <= recon_alpha < 1, got recon_lr={recon_lr}, "
                             f"recon_alpha={recon_alpha}")
        self.features, self.exact, self.recon_weight = features, bool(exact), float(recon_weight)
        self.likelihood_grad, self.sym_recon = likelihood_grad, bool(sym_recon)
        self.recon_lr, self.recon_alpha = float(recon_lr), float(recon_alpha)
        if self.recon_lr > 0:  # the adaptive weight and its moving average live in the state_dict
            self.register_buffer("adaptive_recon_weight", torch.tensor(float(recon_weight),
                                                                       dtype=torch.float64))
            self.register_buffer("recon_ema", torch.tensor(math.nan, dtype=torch.float64))
        self.weight = nn.Parameter(weight)
        # R starts as W^T, the exact inverse of the orthogonal initial W (paper's initialisation).
        if exact:
            self.register_parameter("inverse_weight", None)
        else:
            self.inverse_weight = nn.Parameter(self._transpose_kernel(weight.clone()))
        self.logdet_value_in_training = False  # set by exact_logdet_values()
        self.use_exact_inverse = False  # set by exact_inverse()
        self._recon: torch.Tensor | None = None

    # -- subclass hooks -----------------------------------------------------------------------------
    @staticmethod
    def _transpose_kernel(w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _apply_map(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _logdet_of(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Exact log|det| of the linear map with kernel ``w`` on inputs shaped like ``x`` (scalar)."""
        raise NotImplementedError

    def _surrogate_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Surrogate of ``d log|det W| / dW`` built from ``R`` (exact when ``R = W^-1``)."""
        raise NotImplementedError

    def _inverse_surrogate_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Surrogate of ``d log|det R| / dR`` built from ``W`` (exact when ``R = W^-1``)."""
        raise NotImplementedError

    def _solve(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------
    def _cached_logdet(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Exact log|det| of the map with kernel ``name`` ("weight" or "inverse_weight"), a scalar, O(D^3).
        Computed on every call (with its gradient when one is needed), except inside
        :func:`flowlib.bijectors.cached_weights` without gradients, where repeated evaluation and sampling
        compute it once per kernel and input size."""
        w = getattr(self, name)
        if torch.is_grad_enabled() and w.requires_grad:
            return self._logdet_of(w, x)
        return _cached_without_grad(self, ("logdet", name, tuple(x.shape[2:])), (w,),
                                    lambda: self._logdet_of(w.detach(), x))

    def _exact_logdet(self, x: torch.Tensor) -> torch.Tensor:
        return self._cached_logdet("weight", x)

    def _selfnorm_active(self) -> bool:
        return (not self.exact) and self.training and torch.is_grad_enabled() and self.weight.requires_grad

    def _fused_training(self, x: torch.Tensor):
        """A subclass's fused training pass (a node of :mod:`flowlib.fused`): ``(y, logdet)``, or None to
        take :meth:`reference_forward`."""
        return None

    def forward(self, x: torch.Tensor):
        out = self._fused_training(x) if self._selfnorm_active() else None
        return self.reference_forward(x) if out is None else out

    def _training_logdet_value(self, x: torch.Tensor) -> torch.Tensor:
        """The log-det's value in a self-normalizing training pass: 0, or the exact one (no gradient) inside
        :func:`exact_logdet_values`."""
        if self.logdet_value_in_training:
            with torch.no_grad():
                return self._logdet_of(self.weight.detach(), x)
        return x.new_zeros(())

    def reference_forward(self, x: torch.Tensor):
        """The layer in plain autograd terms (the code the module docstring describes); ``forward`` takes a
        fused node instead where a subclass has one and :mod:`flowlib.fast_paths` are on (same values and
        gradients, ``tests/test_reference_paths.py``)."""
        self._check(x)
        if not self._selfnorm_active():
            return self._apply_map(x, self.weight), self._exact_logdet(x).expand(x.shape[0])
        split = self.likelihood_grad == "split"
        if split:  # the same value; W and R share the data term's gradient (_SplitLikelihoodMap)
            y = _SplitLikelihoodMap.apply(x, self.weight, self.inverse_weight, self)
        else:
            y = self._apply_map(x, self.weight)
        self._recon = self._reconstruction_error(x.detach())
        value = self._training_logdet_value(x)
        with torch.no_grad():
            grad_w = self._surrogate_grad(x)
            grad_r = -self._inverse_surrogate_grad(x) / 2 if split else torch.zeros_like(self.inverse_weight)
            grad_w = grad_w / 2 if split else grad_w
        logdet = _SelfNormLogdet.apply(self.weight, self.inverse_weight, grad_w, grad_r, value)
        return y, logdet.expand(x.shape[0])

    def _reconstruction_error(self, xd: torch.Tensor) -> torch.Tensor:
        """``mean_n ||x - R W x||^2`` (x detached); with ``sym_recon``, averaged with ``||z - W R z||^2``
        (``z = W x``; the target ``z`` detached), the official layers' symmetric option."""
        per_sample = lambda t: t.pow(2).flatten(1).sum(dim=1)  # noqa: E731
        z = self._apply_map(xd, self.weight)
        x_hat = self._apply_map(z, self.inverse_weight)
        error = per_sample(xd - x_hat)
        if self.sym_recon:
            z_hat = self._apply_map(self._apply_map(z, self.inverse_weight), self.weight)
            error = (error + per_sample(z.detach() - z_hat)) / 2
        return error.mean()

    @property
    def current_recon_weight(self) -> float:
        """The reconstruction weight ``lambda`` in force: ``recon_weight``, or its adapted value when
        ``recon_lr > 0`` (:func:`adapt_recon_weights`)."""
        return float(self.adaptive_recon_weight) if self.recon_lr > 0 else self.recon_weight

    @torch.no_grad()
    def adapt_recon_weight(self) -> None:
        """One step of the official layers' adaptive weight (``recon_loss_lr``, a GECO-style update):
        ``ema <- alpha ema + (1 - alpha) E`` (the first ``E`` starts it), then
        ``lambda <- lambda exp(lr ema)``, with ``E`` the last reconstruction error. Since ``E >= 0`` this only
        raises ``lambda``, faster while the inverse is poor (as in the official code, which sets no target).
        No-op when ``recon_lr == 0``."""
        if self.recon_lr == 0 or self.exact or self._recon is None:
            return
        error = self._recon.detach().to(torch.float64)
        if torch.isnan(self.recon_ema):
            self.recon_ema.copy_(error)
        else:
            self.recon_ema.mul_(self.recon_alpha).add_((1 - self.recon_alpha) * error)
        self.adaptive_recon_weight.mul_(torch.exp(self.recon_lr * self.recon_ema))

    def inverse(self, y: torch.Tensor):
        """Decode: ``x = R y`` (learned inverse) or, in :func:`exact_inverse` / ``exact=True``, the solve
        with ``W``. Returns the exact log|det| of the map applied."""
        self._check(y)
        if self.exact or self.use_exact_inverse:
            return self._solve(y), -self._exact_logdet(y).expand(y.shape[0])
        x = self._apply_map(y, self.inverse_weight)
        return x, self._cached_logdet("inverse_weight", y).expand(y.shape[0])

    def reconstruction_loss(self) -> torch.Tensor:
        """``lambda * mean_n ||x_n - R W x_n||^2`` of the last training forward pass (x detached).

        The paper's approximate-inverse objective; its gradient reaches ``R`` and ``W``. Zero for the
        exact twin.
        """
        if self.exact:
            return self.weight.new_zeros(())
        if self._recon is None:
            raise RuntimeError(
                f"{type(self).__name__} has no reconstruction term yet: run a forward pass in training "
                "mode with gradients enabled (model.train()) before collecting selfnorm_loss(model)"
            )
        return self.current_recon_weight * self._recon


class SelfNormLinear(_SelfNormLayer):
    """Self-normalizing fully connected layer ``z = W x`` on (N, D), with learned inverse ``R``.

    The paper's self normalizing fully connected layer: the gradient of ``log|det W|`` is taken as
    ``R^T``; ``R`` is trained with ``recon_weight * ||x - R W x||^2`` (``lambda``; the paper uses 1 for
    its FC models). ``W`` starts random orthogonal and ``R = W^T``. In evaluation the log-det is
    ``slogdet(W)`` (exact). See the module docstring for what the training-mode log-det value means.
    ``exact=True``: the exact-gradient twin (no ``R``, ``slogdet`` with autograd).
    """

    def __init__(self, dim: int, exact: bool = False, recon_weight: float = 1.0, **options):
        if dim < 1:
            raise ValueError(f"SelfNormLinear needs dim >= 1, got {dim}")
        super().__init__(dim, _orthogonal(dim), exact, recon_weight, **options)

    @staticmethod
    def _transpose_kernel(w):
        return w.T.contiguous()

    def _fused_training(self, x):
        if not fast_paths.enabled() or self.sym_recon:
            return None
        self._check(x)
        value = self._training_logdet_value(x)
        y, self._recon, logdet = SelfNormDenseFn.apply(x, self.weight, self.inverse_weight,
                                                       self.likelihood_grad == "split", value)
        return y, logdet.expand(x.shape[0])

    def _check(self, x):
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(
                f"SelfNormLinear({self.features}) expects (N, {self.features}) input, got {tuple(x.shape)}"
            )

    def _apply_map(self, x, w):
        return F.linear(x, w)

    def _logdet_of(self, w, x):
        return torch.linalg.slogdet(w)[1]

    def _surrogate_grad(self, x):
        return self.inverse_weight.T

    def _inverse_surrogate_grad(self, x):
        return self.weight.T

    def _solve(self, y):
        return torch.linalg.solve(self.weight, y.T).T

    def inverse_error(self) -> float:
        """``||R W - I||_F`` (0 for the exact twin)."""
        if self.exact:
            return 0.0
        with torch.no_grad():
            eye = torch.eye(self.features, dtype=self.weight.dtype, device=self.weight.device)
            return torch.linalg.matrix_norm(self.inverse_weight @ self.weight - eye).item()

    def extra_repr(self) -> str:
        return f"dim={self.features}, exact={self.exact}, recon_weight={self.recon_weight}"


def conv_operator(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (D, D) matrix ``J`` of ``x -> conv2d(x, weight, padding=k // 2)`` on (C, height, width)
    inputs, D = C * height * width, so that ``conv(x).flatten() = J @ x.flatten()``.

    Built by convolving the D basis images (O(D^2 k^2 C) time, O(D^2) memory); differentiable in
    ``weight``. Its ``slogdet`` is the exact log-det of a zero-padded convolution.
    """
    c = weight.shape[1]
    d = c * height * width
    basis = torch.eye(d, dtype=weight.dtype, device=weight.device).view(d, c, height, width)
    return F.conv2d(basis, weight, padding=weight.shape[-1] // 2).reshape(d, -1).T


class SelfNormConv2d(_SelfNormLayer):
    """Self-normalizing convolution ``z = w * x`` on (N, C, H, W) ("same" zero padding, odd kernel).

    The paper's self normalizing convolution: the gradient of ``log|det J|`` w.r.t. the kernel is
    taken as ``flip(r) * m`` (see the module docstring; exact when ``R_op = J^{-1}``); ``r`` is trained by
    ``recon_weight * ||x - r * (w * x)||^2``. The kernel starts as a random orthogonal channel mixer at
    the centre tap (zero elsewhere) and ``r`` as its exact inverse.

    Exact log-det in evaluation: for ``kernel_size=1``, ``H * W * log|det w|`` of the C x C matrix; for
    larger kernels, ``slogdet`` of the full (CHW x CHW) convolution matrix :func:`conv_operator` (the
    FFT/circulant shortcut is not exact for zero padding), allowed up to ``max_operator_dim`` dimensions
    (O(D^3) time, O(D^2) memory). The exact inverse likewise solves with that matrix.
    """

    def __init__(self, channels: int, kernel_size: int = 1, exact: bool = False, recon_weight: float = 1.0,
                 max_operator_dim: int = 8192, **options):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 (\"same\" padding), got {kernel_size}")
        if channels < 1:
            raise ValueError(f"SelfNormConv2d needs channels >= 1, got {channels}")
        weight = torch.zeros(channels, channels, kernel_size, kernel_size)
        weight[:, :, kernel_size // 2, kernel_size // 2] = _orthogonal(channels)
        super().__init__(channels, weight, exact, recon_weight, **options)
        self.kernel_size = kernel_size
        self.max_operator_dim = max_operator_dim
        self._last_hw: tuple[int, int] | None = None

    @staticmethod
    def _transpose_kernel(w):
        return w.transpose(0, 1).flip(2, 3).contiguous()

    def _check(self, x):
        if x.dim() != 4 or x.shape[1] != self.features:
            raise ValueError(
                f"SelfNormConv2d({self.features}) expects (N, {self.features}, H, W) input, "
                f"got {tuple(x.shape)}"
            )
        self._last_hw = (x.shape[2], x.shape[3])

    def _apply_map(self, x, w):
        return F.conv2d(x, w, padding=self.kernel_size // 2)

    def _operator(self, w, height, width):
        d = self.features * height * width
        if d > self.max_operator_dim:
            raise ValueError(
                f"the exact log-det / inverse of a {self.kernel_size}x{self.kernel_size} convolution on "
                f"{self.features}x{height}x{width} inputs needs a {d}x{d} matrix, above max_operator_dim="
                f"{self.max_operator_dim}; raise max_operator_dim, use smaller images or kernel_size=1"
            )
        return conv_operator(w, height, width)

    def _logdet_of(self, w, x):
        h, wd = x.shape[2], x.shape[3]
        if self.kernel_size == 1:
            return torch.linalg.slogdet(w[:, :, 0, 0])[1] * (h * wd)
        return torch.linalg.slogdet(self._operator(w, h, wd))[1]

    def _multiplicity(self, height, width, ref):
        """``m[dy, dx] = (H - |dy|)(W - |dx|)``: how often each kernel tap appears in the conv matrix."""
        off = torch.arange(self.kernel_size, device=ref.device) - self.kernel_size // 2
        my = (height - off.abs()).clamp(min=0)
        mx = (width - off.abs()).clamp(min=0)
        return (my[:, None] * mx[None, :]).to(ref.dtype)

    def _surrogate_grad(self, x):
        m = self._multiplicity(x.shape[2], x.shape[3], self.weight)
        return self._transpose_kernel(self.inverse_weight) * m

    def _inverse_surrogate_grad(self, x):
        m = self._multiplicity(x.shape[2], x.shape[3], self.weight)  # symmetric: flip(m) = m
        return self._transpose_kernel(self.weight) * m

    def _solve(self, y):
        n, c, h, w = y.shape
        if self.kernel_size == 1:
            inv = torch.linalg.inv(self.weight[:, :, 0, 0])
            return F.conv2d(y, inv[:, :, None, None])
        op = self._operator(self.weight, h, w)
        return torch.linalg.solve(op, y.reshape(n, -1).T).T.reshape(n, c, h, w)

    def inverse_error(self, height: int | None = None, width: int | None = None) -> float:
        """``||R W - I||_F``: of the C x C matrices for ``kernel_size=1``; otherwise of the convolution
        matrices ``R_op J`` on ``height x width`` images (default: the last input's size)."""
        if self.exact:
            return 0.0
        with torch.no_grad():
            if self.kernel_size == 1:
                w, r = self.weight[:, :, 0, 0], self.inverse_weight[:, :, 0, 0]
            else:
                if height is None or width is None:
                    if self._last_hw is None:
                        raise ValueError("pass height and width, or run the layer on an input first")
                    height, width = self._last_hw
                w = self._operator(self.weight, height, width)
                r = self._operator(self.inverse_weight, height, width)
            eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
            return torch.linalg.matrix_norm(r @ w - eye).item()

    def extra_repr(self) -> str:
        return (f"channels={self.features}, kernel_size={self.kernel_size}, exact={self.exact}, "
                f"recon_weight={self.recon_weight}")


class LeakyReLUFlow(nn.Module):
    """Elementwise leaky ReLU ``y = x`` (x >= 0), ``alpha x`` (x < 0), ``0 < alpha``; the invertible
    nonlinearity between the dense layers of :class:`SelfNormFC`. log|det| = ``log(alpha) * #(x < 0)``."""

    def __init__(self, negative_slope: float = 0.1):
        super().__init__()
        if not negative_slope > 0:
            raise ValueError(f"negative_slope must be > 0 for invertibility, got {negative_slope}")
        self.negative_slope = float(negative_slope)

    def forward(self, x):
        neg = x < 0
        y = torch.where(neg, x * self.negative_slope, x)
        return y, math.log(self.negative_slope) * neg.reshape(x.shape[0], -1).sum(1).to(x.dtype)

    def inverse(self, y):
        neg = y < 0
        x = torch.where(neg, y / self.negative_slope, y)
        return x, -math.log(self.negative_slope) * neg.reshape(y.shape[0], -1).sum(1).to(y.dtype)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class SelfNormFC(Flow):
    """Fully connected self-normalizing flow on (N, D), after the paper's "SNF FC" models.

    ``layers`` blocks of ``ActNorm -> SelfNormLinear -> LeakyReLUFlow`` (the last block without the
    nonlinearity). ActNorm supplies the per-dimension shift and scale and, placed before the dense layer,
    gives its input unit variance in every direction of the data basis, so the reconstruction loss
    ``||x - R W x||^2`` (which only constrains ``R W`` along directions the inputs occupy) pins ``R``
    down evenly. ``exact=True`` builds the exact-gradient twin with the same architecture. ``latents``
    holds every block's output.
    """

    def __init__(self, dim: int, layers: int = 2, exact: bool = False, recon_weight: float = 1.0,
                 negative_slope: float = 0.1, **options):
        super().__init__()
        if dim < 1 or layers < 1:
            raise ValueError(f"dim and layers must be >= 1, got dim={dim}, layers={layers}")
        self.input_shape = (int(dim),)
        self.latent_shapes = [(int(dim),)]
        self.exact = exact
        self.blocks = nn.ModuleList()
        for i in range(layers):
            block = [ActNorm(dim), SelfNormLinear(dim, exact=exact, recon_weight=recon_weight, **options)]
            if i < layers - 1:
                block.append(LeakyReLUFlow(negative_slope))
            self.blocks.append(nn.ModuleList(block))

    def encode(self, x: torch.Tensor) -> Encoding:
        self._check_input(x)
        logdet = x.new_zeros(x.shape[0])
        latents = []
        for block in self.blocks:
            for layer in block:
                x, ld = layer(x)
                logdet = logdet + ld
            latents.append(x)
        return Encoding([x], logdet, latents)

    def decode(self, z) -> torch.Tensor:
        x = self._as_latent_list(z)[0]
        for block in reversed(self.blocks):
            for layer in reversed(block):
                x, _ = layer.inverse(x)
        return x


class SelfNormGlow(Glow):
    """Glow (:class:`flowlib.models.Glow`) whose dense / 1x1 mixing layers are self-normalizing.

    Every flow step is ``ActNorm -> SelfNormLinear`` (tabular) or ``SelfNormConv2d(kernel_size)``
    (images) ``-> AffineCoupling``, replacing Glow's LU layer by an unconstrained ``W`` trained with the
    surrogate gradient (the paper's "SNF Glow"). ``recon_weight`` defaults to 100, the official code's
    value for its MNIST Glow (``selfnorm_glow_mnist.py``; the paper uses 100-1000 for image models).
    ``exact=True`` is the exact-gradient twin (unconstrained ``W``, ``slogdet`` gradient). ``options``
    (``likelihood_grad``, ``sym_recon``, ``recon_lr``, ``recon_alpha``) go to every self-normalizing layer.
    """

    def __init__(self, shape, levels: int | None = None, depth: int = 8, hidden: int = 64,
                 exact: bool = False, recon_weight: float = 100.0, kernel_size: int = 1, **options):
        super().__init__(shape, levels=levels, depth=depth, hidden=hidden)
        self.exact, self.kernel_size = exact, kernel_size
        steps = self.steps if not self.image else [s for level in self.level_steps for s in level]
        for step in steps:
            f = step.mix.features
            kw = dict(exact=exact, recon_weight=recon_weight, **options)
            step.mix = SelfNormConv2d(f, kernel_size, **kw) if self.image else SelfNormLinear(f, **kw)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", exact={self.exact}, kernel_size={self.kernel_size}"


def selfnorm_layers(model: nn.Module) -> list[_SelfNormLayer]:
    """All :class:`SelfNormLinear` / :class:`SelfNormConv2d` layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _SelfNormLayer)]


def selfnorm_loss(model: nn.Module) -> torch.Tensor:
    """Sum over layers of ``lambda * mean_n ||x_n - R W x_n||^2`` from the last training forward pass.

    Add it to ``-model.log_prob(x).mean()`` to train a self-normalizing flow; it is 0 for the exact twin
    (so the same loop trains both).
    """
    layers = selfnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no self-normalizing layers")
    total = layers[0].reconstruction_loss()
    for layer in layers[1:]:
        total = total + layer.reconstruction_loss()
    return total


def adapt_recon_weights(model: nn.Module) -> None:
    """After a training step: update the adaptive reconstruction weight of every layer built with
    ``recon_lr > 0`` (:meth:`_SelfNormLayer.adapt_recon_weight`); layers with a fixed weight are left as they
    are. :func:`fit` calls it after every optimizer step."""
    for layer in selfnorm_layers(model):
        layer.adapt_recon_weight()


def inverse_errors(model: nn.Module) -> list[float]:
    """``||R W - I||_F`` of every self-normalizing layer (see ``inverse_error``)."""
    return [layer.inverse_error() for layer in selfnorm_layers(model)]


@contextmanager
def _set_flag(model: nn.Module, name: str, value: bool) -> Iterator[nn.Module]:
    layers = selfnorm_layers(model)
    old = [getattr(layer, name) for layer in layers]
    try:
        for layer in layers:
            setattr(layer, name, value)
        yield model
    finally:
        for layer, v in zip(layers, old):
            setattr(layer, name, v)


def exact_logdet_values(model: nn.Module, enabled: bool = True):
    """Context manager: in training mode, self-normalizing layers report the exact log-det *value*
    (O(D^3), no gradient through it) instead of 0; their gradient is still the surrogate."""
    return _set_flag(model, "logdet_value_in_training", enabled)


def exact_inverse(model: nn.Module, enabled: bool = True):
    """Context manager: ``inverse`` / ``decode`` / ``sample`` solve with ``W`` instead of applying ``R``."""
    return _set_flag(model, "use_exact_inverse", enabled)


# ------------------------------------------------------------------------------------------------ training

Preprocess = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@torch.no_grad()
def exact_test_nll(model: nn.Module, x: torch.Tensor, preprocess: Preprocess | None = None, draws: int = 1,
                   seed: int = 1234, batch_size: int = 4096, per_example: bool = False):
    """Exact negative log-likelihood ``-log p(x)`` (nats per example) of ``model`` on ``x``.

    Evaluated in ``eval`` mode, so every self-normalizing layer contributes its exact ``log|det W|``
    (``slogdet``); the model's training flag is restored afterwards. ``preprocess(batch, generator)``
    maps raw data to the model's input space (e.g. uniform dequantisation); it is applied ``draws``
    times with a generator seeded by ``seed`` (fixed draws: the same number on every call) and the NLLs
    are averaged over the draws. Any constant of the preprocessing (such as ``D log bins``) is the
    caller's to add. Returns the mean over examples (a float) or, with ``per_example=True``, the (N,)
    float64 tensor of per-example NLLs (for medians and outliers). The weights are fixed meanwhile, so each
    layer's log-det is computed once (:func:`flowlib.bijectors.cached_weights`).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    n_draws = draws if preprocess is not None else 1
    try:
        with cached_weights(model):
            for _ in range(n_draws):
                parts = []
                for xb in x.split(batch_size):
                    xb = preprocess(xb, g) if preprocess is not None else xb
                    parts.append(-model.log_prob(xb).double().cpu())
                total += torch.cat(parts)
    finally:
        model.train(was_training)
    nll = total / n_draws
    return nll if per_example else nll.mean().item()


def fit(model: nn.Module, x_train: torch.Tensor, x_val: torch.Tensor | None = None, *, steps: int,
        batch_size: int = 128, lr: float = 1e-3, seed: int = 0, preprocess: Preprocess | None = None,
        eval_every: int | None = None, progress: bool = True, desc: str | None = None,
        patience: int | None = None, teacher: nn.Module | None = None, distill: str = "ilkd",
        distill_weight: float | None = None, pairs: Sequence[tuple[int, int]] | None = None,
        distance: str = "mse") -> list[dict]:
    """Train a self-normalizing flow (or its exact twin) by maximum likelihood; returns the history.

    Minimises ``-model.log_prob(x).mean() + selfnorm_loss(model)`` with Adam (``lr``) on minibatches of
    ``batch_size`` drawn with replacement from ``x_train`` by a generator seeded with ``seed``; the same
    generator draws ``preprocess``'s noise, so an exact twin and a self-normalizing model built from the
    same ``torch.manual_seed`` see the same batches. Before the first step one batch is passed through
    the model without gradients (ActNorm's data-dependent initialisation). After every step the adaptive
    reconstruction weights move (:func:`adapt_recon_weights`; only layers built with ``recon_lr > 0``).

    For a self-normalizing model the training objective is *not* a likelihood (its value omits the
    layers' ``log|det W|``, see the module docstring); for the exact twin it is the batch NLL. What is
    comparable between the two is ``val_nll``, the exact NLL (:func:`exact_test_nll`, nats per example)
    of ``x_val``.

    ``patience`` (with ``x_val``): stop once ``val_nll`` has not improved for that many evaluations, and
    in every case end with the weights of the best evaluation (``steps`` is then a cap); the history's
    last record says ``stopped`` (the step of the last evaluation) and ``best_step``.

    ``teacher`` (a trained flow, used frozen and in eval mode): add latent knowledge distillation, Eq. 12
    (``distill="lkd"``: the final latents) or Eq. 13 (``"ilkd"``: the mean over ``pairs`` of
    ``(student_index, teacher_index)`` into the models' ``latents``, the official code's averaging) with
    ``distance`` (``"mse"``, as the official code; or ``"l1"``). The loss is
    ``NLL + selfnorm_loss + distill_weight * distance``; the default weight,
    ``(0.1 / 0.9) * D ln 2``, is the paper's ``lambda = (0.9, 0.1)`` with the NLL in bits per dimension
    (the official code's unit for images), rescaled so that the NLL stays in nats as in the plain run.

    History: one record at step 0 (after the initialisation pass) and every ``eval_every`` steps (default
    ``steps // 20``) and at the last step, each a dict with ``step``; ``loss`` and ``recon`` (means of
    the objective and of ``selfnorm_loss`` over the steps since the previous record; not at step 0) and
    ``latent`` (the distillation distance, with a teacher); ``val_nll`` (if ``x_val`` is given);
    ``inverse_errors`` (``||R W - I||_F`` per self-normalizing layer, 0 for the exact twin) and their
    maximum ``inverse_error``; ``time`` (seconds spent in training steps so far, evaluation excluded).
    Raises ``FloatingPointError`` if the loss stops being finite.
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
    eval_every = max(1, steps // 20) if eval_every is None else int(eval_every)
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if patience is not None and (x_val is None or patience < 1):
        raise ValueError(f"patience needs x_val and must be >= 1, got patience={patience}")
    if not selfnorm_layers(model):
        raise ValueError(f"{type(model).__name__} has no self-normalizing layers: fit() trains the models "
                         "of this module (SelfNormFC, SelfNormGlow and their exact twins)")
    if teacher is not None:
        if distill not in ("lkd", "ilkd"):
            raise ValueError(f"distill must be 'lkd' or 'ilkd', got {distill!r}")
        if distill == "ilkd" and not pairs:
            raise ValueError("ILKD needs pairs=[(student_index, teacher_index), ...] into the models' "
                             "latents")
        if distill_weight is None:
            distill_weight = 0.1 / 0.9 * math.prod(model.input_shape) * math.log(2.0)
        freeze(teacher)
    g = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]

    def batch() -> torch.Tensor:
        xb = x_train[torch.randint(n, (batch_size,), generator=g)]
        return preprocess(xb, g) if preprocess is not None else xb

    def record(step: int, sums: dict[str, float], count: int, elapsed: float) -> dict:
        rec: dict = {"step": step}
        if count:
            rec.update({k: v / count for k, v in sums.items()})
        if x_val is not None:
            rec["val_nll"] = exact_test_nll(model, x_val, preprocess, seed=seed + 1)
        errs = inverse_errors(model)
        rec.update(inverse_errors=errs, inverse_error=max(errs), time=elapsed)
        return rec

    def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if teacher is None:
            return -model.log_prob(x).mean(), selfnorm_loss(model), None
        enc = model.encode(x)
        nll = -(standard_normal_logprob(enc.z) + enc.logdet).mean()
        with torch.no_grad():
            t_enc = teacher.encode(x)
        if distill == "lkd":
            latent = latent_distance(t_enc.flat(), enc.flat(), distance)
        else:
            latent = sum(latent_distance(t_enc.latents[j], enc.latents[i], distance) for i, j in pairs)
            latent = latent / len(pairs)
        return nll, selfnorm_loss(model), latent

    model.train()
    with torch.no_grad():
        model.log_prob(batch())
    history = [record(0, {}, 0, 0.0)]
    best = (history[0].get("val_nll", math.inf), 0, copy.deepcopy(model.state_dict()))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    keys = ("loss", "recon") + (("latent",) if teacher is not None else ())
    sums, count, elapsed, waited = dict.fromkeys(keys, 0.0), 0, 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc or type(model).__name__, leave=False)
    teacher_weights = cached_weights(teacher) if teacher is not None else contextlib.nullcontext()
    try:
        with teacher_weights:
            for step in range(1, steps + 1):
                t0 = time.perf_counter()
                x = batch()
                opt.zero_grad(set_to_none=True)
                nll, recon, latent = objective(x)
                loss = nll + recon if latent is None else nll + recon + distill_weight * latent
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
                loss.backward()
                opt.step()
                adapt_recon_weights(model)
                elapsed += time.perf_counter() - t0
                sums["loss"] += loss.item()
                sums["recon"] += recon.item()
                if latent is not None:
                    sums["latent"] += latent.item()
                count += 1
                if step % eval_every == 0 or step == steps:
                    history.append(record(step, sums, count, elapsed))
                    sums, count = dict.fromkeys(keys, 0.0), 0
                    last = history[-1]
                    if x_val is not None and last["val_nll"] < best[0]:
                        best, waited = (last["val_nll"], step, copy.deepcopy(model.state_dict())), 0
                    else:
                        waited += 1
                    if bar is not None:
                        post = {"loss": f"{last['loss']:.4g}", "max ||RW-I||": f"{last['inverse_error']:.2g}"}
                        if x_val is not None:
                            post["val_nll"] = f"{last['val_nll']:.4g}"
                        bar.set_postfix(post, refresh=False)
                    if patience is not None and waited >= patience:
                        break
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if patience is not None:
        model.load_state_dict(best[2])
        history[-1].update(stopped=history[-1]["step"], best_step=best[1], best_val_nll=best[0])
    return history
