"""Invertible building blocks (bijectors) for GLOW and MAF.

Convention (see DESIGN.md): every bijector is an ``nn.Module`` with

* ``forward(x) -> (y, logdet)`` in the *encode* (normalizing) direction, and
* ``inverse(y) -> (x, logdet)`` in the *decode* (generative) direction,

where ``logdet`` is the per-sample ``log|det J|`` of the map that was applied, shape ``(N,)``, on the
input's device and dtype. ``forward`` followed by ``inverse`` is the identity and the two log-dets sum
to zero.

Inputs are either tabular ``(N, D)`` or images ``(N, C, H, W)``; layers that work on both say so.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_paths, fused, scratch
from .fused import _cached_without_grad, cached_weights  # noqa: F401  (re-exported: part of this module's interface)
from .precision import conditioner_dtype

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "BatchNormFlow",
    "COUPLING_CONDITIONERS",
    "ImagePreprocess",
    "InvertibleConv1x1",
    "InvertibleLinear",
    "MADE",
    "MaskedAffineAutoregressive",
    "NonFiniteBatchError",
    "Permute",
    "Reverse",
    "Split",
    "Squeeze",
    "cached_weights",
    "dequantize",
]


class NonFiniteBatchError(ValueError):
    """A batch (or a layer's input) holds NaN or inf values, or its statistics overflow; nothing was changed.
    :func:`flowlib.train.train` reports it as divergence when the data itself was finite."""


def _check_batch(x: torch.Tensor, name: str, training: bool = True) -> None:
    """Refuse a batch that would corrupt the state a training-mode pass sets from it (ActNorm's
    initialisation, batch-norm running statistics): ``ValueError`` for 0 samples (in training mode) or any
    NaN / inf value. One reduction: a finite sum means every value is finite; only when it is not (NaN, inf,
    or an overflowing sum of large values) is each value checked."""
    if training and x.shape[0] == 0:
        raise ValueError(
            f"{name} got a batch of 0 samples in training mode (shape {tuple(x.shape)}); a training-mode "
            "pass sets state from the batch (ActNorm initialisation, batch-norm statistics): pass a "
            "non-empty batch"
        )
    if x.device.type == "meta" or not x.numel() or not x.is_floating_point():  # (meta: no values to check)
        return
    if not math.isfinite(x.sum().item()):  # (a scalar .item() and math.isfinite: ~4x cheaper than isfinite())
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            n_bad = int(bad.sum())
            rows = int(bad.flatten(1).any(1).sum()) if x.dim() > 1 else n_bad
            raise NonFiniteBatchError(
                f"{name}: the batch contains NaN or inf ({n_bad} non-finite values in {rows} of {x.shape[0]} "
                "samples); nothing was changed. Drop or fix those samples"
            )


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of the small tensor ``t`` is finite: one sum, then (only if that is not finite,
    which an overflowing sum of finite values can also be) each value."""
    return t.device.type == "meta" or math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def _sum_except_batch(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(dim=1)  # (reshape(N, -1) fails for N = 0)


def _check_features(x: torch.Tensor, features: int, name: str) -> None:
    if x.dim() not in (2, 4):
        raise ValueError(
            f"{name} expects tabular (N, D) or image (N, C, H, W) input, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != features:
        raise ValueError(
            f"{name} was built for {features} features/channels but got input of shape "
            f"{tuple(x.shape)} (dimension 1 is {x.shape[1]}); build it with the data's size"
        )


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``; during an evaluation pass its output goes into an arena buffer (:mod:`flowlib.scratch`)
    instead of new memory. The same ``addmm``, so the values are identical."""
    out = scratch.out((x.shape[0], weight.shape[0]), x) if x.dim() == 2 and bias is not None else None
    if out is None:
        return F.linear(x, weight, bias)
    return torch.addmm(bias, x, weight.T, out=out)


def _pixels(x: torch.Tensor) -> int:
    return x.shape[2] * x.shape[3] if x.dim() == 4 else 1


def _per_feature(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape a per-feature vector (C,) to broadcast over ``x`` (N, C) or (N, C, H, W)."""
    return p.view(1, -1, 1, 1) if x.dim() == 4 else p.view(1, -1)


class ActNorm(nn.Module):
    """Activation normalisation, Eq. 6: ``y = (x - b) * exp(-log_s)`` per channel.

    The encode direction standardises; the paper writes the decode direction ``x = s * z + b``.
    On the first training-mode forward pass, ``b`` and ``s`` are set from the batch so that the output
    has zero mean and unit variance per channel (data-dependent initialisation). Until then the layer is
    the identity. An empty batch or one with NaN / inf values cannot initialise the layer: ``ValueError``,
    and the layer stays as it was. Works on (N, C) and (N, C, H, W).
    """

    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        _check_size(features, "features", "ActNorm")
        self.features = features
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        _check_batch(x, "ActNorm's data-dependent initialisation")  # before any state changes
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False) if x.numel() // x.shape[1] > 1 else torch.ones_like(mean)
        if not _all_finite(mean + std):
            raise ValueError(
                "ActNorm's data-dependent initialisation: the batch's per-channel mean / std overflow "
                "(values too large for the dtype); the layer was left uninitialised"
            )
        self.bias.copy_(mean)
        self.log_scale.copy_(torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x):
        _check_features(x, self.features, "ActNorm")
        if self.training and not bool(self.initialized):
            self._initialize(x)
        scale = torch.exp(-self.log_scale)
        # (x - b) * scale as one pass over x: x * scale + (-b * scale)
        y = torch.addcmul(_per_feature(-self.bias * scale, x), x, _per_feature(scale, x))
        logdet = -self.log_scale.sum() * _pixels(x)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        _check_features(y, self.features, "ActNorm")
        x = y * _per_feature(torch.exp(self.log_scale), y) + _per_feature(self.bias, y)
        logdet = self.log_scale.sum() * _pixels(y)
        return x, logdet.expand(y.shape[0])


class InvertibleLinear(nn.Module):
    """Invertible linear map with the LU parameterisation of Eq. 8: ``W = P L (U + diag(s))``.

    ``P`` is a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular and ``s``
    stored as sign and log-magnitude, so ``log|det W| = sum(log|s|)`` (Eq. 9 without the pixel factor).
    Initialised from a random orthogonal matrix. Acts on (N, D); :class:`InvertibleConv1x1` applies the
    same matrix at every pixel of (N, C, H, W).
    """

    def __init__(self, features: int):
        super().__init__()
        _check_size(features, "features", type(self).__name__)
        self.features = features
        q, _ = torch.linalg.qr(torch.randn(features, features, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(features, features), -1))
        self.register_buffer("eye", torch.eye(features))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def weight(self) -> torch.Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        return (self.log_s.sum() * _pixels(x)).expand(x.shape[0])

    def forward(self, x):
        _check_features(x, self.features, type(self).__name__)
        return self._mix(x, self._matrix(inverse=False)), self._logdet(x)

    def inverse(self, y):
        _check_features(y, self.features, type(self).__name__)
        return self._mix(y, self._matrix(inverse=True)), -self._logdet(y)

    def _matrix(self, inverse: bool) -> torch.Tensor:
        """``W`` or ``W^-1``: recomputed on each call, or computed once inside :func:`cached_weights`."""
        def make():
            w = self.weight()
            return torch.linalg.inv(w) if inverse else w

        return _cached_without_grad(self, ("matrix", inverse), (self.lower, self.upper, self.log_s), make)

    @staticmethod
    def _mix(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # Eq. 7: a 1x1 convolution (the fast path computes it as a batched matrix product)
            return fused.mix_channels(x, w) if fast_paths.enabled() else F.conv2d(x, w.view(*w.shape, 1, 1))
        return x @ w.T


class InvertibleConv1x1(InvertibleLinear):
    """Invertible 1x1 convolution (Eq. 7-9): the LU-parameterised matrix applied at every pixel.

    ``log|det J| = h * w * sum(log|s|)`` (Eq. 9).
    """

    def __init__(self, channels: int):
        super().__init__(channels)


def _split_sizes(features: int, name: str) -> tuple[int, int]:
    if features < 2:
        raise ValueError(
            f"{name} needs at least 2 channels/features to split into two halves, got {features}; "
            "squeeze the image first (Glow does) or use more features"
        )
    return features // 2, features - features // 2


def _check_size(value, name: str, owner: str) -> None:
    """A layer size (features, channels, hidden units, depth...) must be an integer >= 1."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")


COUPLING_CONDITIONERS = ("mlp", "official")


def _coupling_net(in_f: int, out_f: int, hidden: int, image: bool, conditioner: str = "mlp") -> nn.Module:
    """The conditioner of a coupling layer. The last layer starts at zero so the coupling starts as
    the identity map (Glow's zero-initialised output convolution).

    Tabular conditioners: ``"mlp"``: Linear-ReLU-Linear-ReLU-Linear (2 hidden layers). ``"official"``: the
    network of ``get_block_1d`` in the paper's code (``models/flows.py`` of ``vklyukin/nf_distillation``),
    6 Linear layers: ``in -> h``, then ``h -> h`` three times, each followed by ReLU, then ``h -> h``
    followed by Tanh, then ``h -> out``."""
    _check_size(hidden, "hidden", "coupling layer")
    if conditioner not in COUPLING_CONDITIONERS:
        raise ValueError(f"unknown coupling conditioner {conditioner!r}; choose one of "
                         f"{COUPLING_CONDITIONERS}")
    if image:
        if conditioner != "mlp":
            raise ValueError(
                f"conditioner={conditioner!r} is a tabular (Linear) network; an image coupling uses the "
                "convolutional conditioner: leave conditioner='mlp' (the default)"
            )
        last = nn.Conv2d(hidden, out_f, 3, padding=1)
        net = nn.Sequential(
            nn.Conv2d(in_f, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True), last,
        )
    elif conditioner == "mlp":
        last = nn.Linear(hidden, out_f)
        net = nn.Sequential(
            nn.Linear(in_f, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), last,
        )
    else:  # "official": get_block_1d
        last = nn.Linear(hidden, out_f)
        layers = [nn.Linear(in_f, hidden), nn.ReLU(inplace=True)]
        for _ in range(3):
            layers += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
        net = nn.Sequential(*layers, nn.Linear(hidden, hidden), nn.Tanh(), last)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return net


class AffineCoupling(nn.Module):
    """GLOW's affine coupling layer.

    The input is split along dimension 1 into ``x_a`` (first half) and ``x_b``; a network of ``x_a``
    gives a shift ``t`` and a raw scale ``r``; ``y_b = (x_b + t) * s`` with
    ``s = sigmoid(r + 2) / sigmoid(2)``. The sigmoid keeps the scale bounded (Glow's numerically stable
    choice); dividing by ``sigmoid(2)`` makes the zero-initialised layer exactly the identity.
    ``image=True`` uses 3x3/1x1 convolutions for (N, C, H, W); otherwise an MLP for (N, D).

    ``conditioner`` (tabular only) selects that MLP: ``"mlp"`` (the default, and what older checkpoints
    hold) has two hidden layers of width ``hidden``; ``"official"`` is ``get_block_1d`` of the paper's code
    (``vklyukin/nf_distillation``, ``models/flows.py``): five hidden layers of width ``hidden``, the first
    four followed by ReLU and the fifth by Tanh, then the output layer (6 Linear layers). As there, it takes
    the first half ``x_a`` (``D // 2`` features) and outputs ``2 * (D - D // 2)`` values, shift and raw scale
    interleaved; with it the tabular Glow presets reproduce Table 2's GLOW parameter counts. Two
    differences from the official code that leave the parameter count unchanged are kept: the output layer
    starts at zero (there it has PyTorch's default initialisation) and the scale is divided by
    ``sigmoid(2)`` (the official ``sigmoid(r + 2)`` is not the identity at zero). An image coupling accepts
    only ``"mlp"`` (``ValueError`` otherwise).
    """

    def __init__(self, features: int, hidden: int, image: bool = False, conditioner: str = "mlp"):
        super().__init__()
        self.features = features
        self.conditioner = conditioner
        self.d_a, self.d_b = _split_sizes(features, "AffineCoupling")
        self.net = _coupling_net(self.d_a, 2 * self.d_b, hidden, image, conditioner)
        self.register_buffer("offset", torch.tensor(2.0))

    def extra_repr(self) -> str:
        return f"features={self.features}, conditioner={self.conditioner!r}"

    def _shift_raw(self, x_a, reference: bool = False):
        """The conditioner's two outputs (interleaved channels: even = shift, odd = raw scale): on the
        reference path (``reference``, or the fast paths off) the network as written with its output sliced,
        else :meth:`_conditioner`. Inside :func:`flowlib.precision.conditioner_precision` a training pass
        computes them under autocast and returns them in ``x_a``'s dtype."""
        net = self._reference_conditioner if reference or not fast_paths.enabled() else self._conditioner
        dtype = conditioner_dtype()
        if dtype is not None and dtype != x_a.dtype:
            with torch.autocast(x_a.device.type, dtype=dtype):
                outs = net(x_a)
            return tuple(o.to(x_a.dtype) for o in outs)
        return net(x_a)

    def _reference_conditioner(self, x_a):
        out = self.net(x_a)
        return out[:, 0::2], out[:, 1::2]

    def _conditioner(self, x_a):
        """The fast path's: each output computed as its own contiguous tensor (the last layer's weight split,
        not its output sliced), linear outputs in scratch buffers during evaluation passes."""
        last = self.net[-1]
        if isinstance(last, nn.Conv2d):
            # images: one convolution with the output channels regrouped (all shifts, then all raw scales),
            # its output cut in two contiguous tensors; two half-size convolutions made a GLOW training step
            # ~19% slower, most of it in their backward passes (benchmarks/image_peers.py). The whole network
            # runs channels-last (fused.channels_last_conv_stack).
            weight = torch.cat([last.weight[0::2], last.weight[1::2]])
            bias = torch.cat([last.bias[0::2], last.bias[1::2]])
            h = fused.channels_last_conv_stack(self.net[:-1], x_a)
            return fused.ContiguousHalvesFn.apply(F.conv2d(h, weight, bias, padding=last.padding))
        h = x_a
        for layer in self.net[:-1]:
            if isinstance(layer, nn.Linear):
                h = _linear(h, layer.weight, layer.bias)  # (an arena buffer during an evaluation pass)
            elif isinstance(layer, nn.Tanh):
                h = h.tanh_()  # in place on the fresh linear output, as ReLU(inplace=True) is
            else:
                h = layer(h)
        return tuple(_linear(h, last.weight[k::2], last.bias[k::2]) for k in (0, 1))

    def _scale_shift(self, x_a, reference: bool = False):
        shift, raw = self._shift_raw(x_a, reference)
        log_scale = F.logsigmoid(raw + self.offset) - F.logsigmoid(self.offset)
        return shift, log_scale

    def reference_forward(self, x):
        """The layer in plain PyTorch (the fast path computes the same): ``y_b = (x_b + t) * s`` with
        ``s = sigmoid(r + 2) / sigmoid(2)``, ``log|det J| = sum log s``."""
        x_a, x_b = x.split([self.d_a, self.d_b], dim=1)
        shift, log_scale = self._scale_shift(x_a, reference=True)
        return torch.cat([x_a, (x_b + shift) * torch.exp(log_scale)], dim=1), _sum_except_batch(log_scale)

    def forward(self, x):
        _check_features(x, self.features, "AffineCoupling")
        if not fast_paths.enabled():
            return self.reference_forward(x)
        x_a, x_b = x.split([self.d_a, self.d_b], dim=1)  # one cat in backward, not two scatters
        shift, raw = self._shift_raw(x_a)
        # the offset buffer is always 2 (kept for checkpoints); a Python float also works on the meta device
        if torch.is_grad_enabled():
            y_b, logdet = fused.AffineCouplingFn.apply(x_b, shift, raw, 2.0)
        else:  # evaluation: the same operations, in place in the conditioner's fresh outputs
            y_b, logdet = fused.AffineCouplingFn.compute(x_b, shift, raw, 2.0, in_place=True)[:2]
            if x.dim() == 2:
                return torch.cat([x_a, y_b], dim=1, out=scratch.out(x.shape, x)), logdet
        return torch.cat([x_a, y_b], dim=1), logdet

    def inverse(self, y):
        _check_features(y, self.features, "AffineCoupling")
        y_a, y_b = y.split([self.d_a, self.d_b], dim=1)
        shift, log_scale = self._scale_shift(y_a)
        x_b = y_b * torch.exp(-log_scale) - shift
        return torch.cat([y_a, x_b], dim=1), -_sum_except_batch(log_scale)


class AdditiveCoupling(nn.Module):
    """Additive (NICE / RealNVP-style) coupling: ``y_b = x_b + t(x_a)``; volume preserving."""

    def __init__(self, features: int, hidden: int, image: bool = False):
        super().__init__()
        self.features = features
        self.d_a, self.d_b = _split_sizes(features, "AdditiveCoupling")
        self.net = _coupling_net(self.d_a, self.d_b, hidden, image)

    def forward(self, x):
        _check_features(x, self.features, "AdditiveCoupling")
        x_a, x_b = x.split([self.d_a, self.d_b], dim=1)  # one cat in backward, not two scatters
        y = torch.cat([x_a, x_b + self.net(x_a)], dim=1)
        return y, x.new_zeros(x.shape[0])

    def inverse(self, y):
        _check_features(y, self.features, "AdditiveCoupling")
        y_a, y_b = y.split([self.d_a, self.d_b], dim=1)
        x = torch.cat([y_a, y_b - self.net(y_a)], dim=1)
        return x, y.new_zeros(y.shape[0])


class Squeeze(nn.Module):
    """Space-to-depth: (N, C, H, W) -> (N, 4C, H/2, W/2). A permutation, so log-det 0."""

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"Squeeze expects (N, C, H, W) images, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got {h}x{w}")
        x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(n, 4 * c, h // 2, w // 2), x.new_zeros(n)

    def inverse(self, y):
        n, c, h, w = y.shape
        if c % 4:
            raise ValueError(f"Squeeze.inverse needs channels divisible by 4, got {c}")
        x = y.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c // 4, 2 * h, 2 * w), y.new_zeros(n)


class Split(nn.Module):
    """Multi-scale split with a learned conditional prior (GLOW).

    ``forward(x)`` splits the channels into ``h`` (kept, flows on) and ``z`` (factored out). A
    zero-initialised convolution of ``h`` gives the mean and log-std of a Gaussian prior for ``z``;
    instead of scoring ``z`` under that prior we standardise it, ``eps = (z - mean) * exp(-log_std)``,
    which is a bijection conditioned on ``h`` with log-det ``-sum(log_std)``. Every factored-out latent
    is then standard normal, so the same ``eps`` noise drives teacher and student (SKD, Eq. 14) and
    norm-preserving interpolation (Eq. 16) acts on Gaussian latents.

    Returns ``(h, eps, logdet)``; ``inverse(h, eps)`` returns ``(x, logdet)``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.c_keep, self.c_out = _split_sizes(channels, "Split")
        self.prior = nn.Conv2d(self.c_keep, 2 * self.c_out, 3, padding=1)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)

    def _mean_logstd(self, h):
        p = self.prior(h)
        return p[:, 0::2], p[:, 1::2]

    def forward(self, x):
        _check_features(x, self.channels, "Split")
        h, z = x[:, : self.c_keep], x[:, self.c_keep :]
        mean, log_std = self._mean_logstd(h)
        eps = (z - mean) * torch.exp(-log_std)
        return h, eps, -_sum_except_batch(log_std)

    def inverse(self, h, eps):
        mean, log_std = self._mean_logstd(h)
        z = eps * torch.exp(log_std) + mean
        return torch.cat([h, z], dim=1), _sum_except_batch(log_std)


class Permute(nn.Module):
    """A fixed permutation of dimension 1 (features or channels); log-det 0.

    ``Permute(features, seed=s)`` draws a random permutation from ``seed``; ``Permute(perm=...)`` uses a
    given one.
    """

    def __init__(self, features: int, seed: int | None = 0, perm: torch.Tensor | None = None):
        super().__init__()
        if perm is None:
            g = torch.Generator().manual_seed(seed if seed is not None else 0)
            perm = torch.randperm(features, generator=g)
        perm = torch.as_tensor(perm, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(features)):
            raise ValueError(f"perm must be a permutation of 0..{features - 1}")
        self.features = features
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x):
        _check_features(x, self.features, type(self).__name__)
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y):
        _check_features(y, self.features, type(self).__name__)
        return y[:, self.inv_perm], y.new_zeros(y.shape[0])


class Reverse(Permute):
    """Reverse the order of the features (MAF's layer between autoregressive blocks)."""

    def __init__(self, features: int):
        super().__init__(features, perm=torch.arange(features - 1, -1, -1))

    # flip is a strided copy; fancy indexing (and its scatter backward) is ~10x slower on the CPU
    def forward(self, x):
        _check_features(x, self.features, "Reverse")
        return x.flip(1), x.new_zeros(x.shape[0])

    def inverse(self, y):
        _check_features(y, self.features, "Reverse")
        return y.flip(1), y.new_zeros(y.shape[0])


class _MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE's connectivity).

    Input columns the mask never uses are left out of the product: in MADE's first layer every input whose
    degree exceeds the largest hidden degree is unused (for D = 63 and 32 hidden units, inputs 33..63), so
    the layer multiplies only the used leading columns, which halves its cost there.
    """

    def __init__(self, in_f: int, out_f: int, mask: torch.Tensor):
        super().__init__(in_f, out_f)
        self.register_buffer("mask", mask)
        used = mask.any(0).nonzero()
        # a prefix: every later column of the mask is 0
        self.used_inputs = int(used.max()) + 1 if used.numel() else 1

    def masked_weight(self) -> torch.Tensor:
        k = self.used_inputs
        return _cached_without_grad(self, "masked", (self.weight,),
                                    lambda: self.weight[:, :k] * self.mask[:, :k])

    def _prepared(self, key, make):
        return _cached_without_grad(self, key, (self.weight, self.bias), make)

    def forward(self, x):
        return _linear(x[:, : self.used_inputs], self.masked_weight(), self.bias)

    def chunk_parameters(self, chunks: int, scales=None, reverse_out: bool = False,
                         width: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The masked weight and the bias split into ``chunks`` equal groups of units, group ``j`` multiplied
        by ``scales[j]`` if given (and each group's units in reverse order with ``reverse_out``). ``width`` >
        out / chunks pads every group with units whose weights and bias are 0 (so they output exactly 0)."""
        def make():
            weights, biases = self.masked_weight().chunk(chunks, 0), self.bias.chunk(chunks)
            if reverse_out:
                weights, biases = [w.flip(0) for w in weights], [b.flip(0) for b in biases]
            extra = 0 if width is None else width - weights[0].shape[0]
            if extra > 0:
                weights = [F.pad(w, (0, 0, 0, extra)) for w in weights]
                biases = [F.pad(b, (0, extra)) for b in biases]
            if scales is not None:
                weights = [w * c if c != 1 else w for w, c in zip(weights, scales)]
                biases = [b * c if c != 1 else b for b, c in zip(biases, scales)]
            return weights, biases

        scale_key = None if scales is None else tuple(float(c) for c in scales)
        return self._prepared(("chunks", chunks, scale_key, reverse_out, width), make)

    def forward_chunks(self, x, chunks: int, scales=None, reverse_out: bool = False,
                       width: int | None = None) -> list[torch.Tensor]:
        """The output split as :meth:`chunk_parameters` splits the units, each group computed as its own
        contiguous (N, out / chunks) tensor. Slicing one (N, out) result would leave strided views, and
        elementwise kernels on those run several times slower."""
        weights, biases = self.chunk_parameters(chunks, scales, reverse_out, width)
        x = x[:, : self.used_inputs]
        return [_linear(x, w, b) for w, b in zip(weights, biases)]


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015).

    Output ``i`` (for every one of ``n_outputs`` heads) depends only on inputs ``< i`` in the given
    ``order`` (default natural order). Hidden units get degrees ``1..D-1`` assigned cyclically, so the
    layout is deterministic. Returns a tensor of shape (N, n_outputs, D).
    """

    def __init__(self, features: int, hidden: int = 32, layers: int = 2, n_outputs: int = 2):
        super().__init__()
        for value, name in ((features, "features"), (hidden, "hidden"), (layers, "layers"),
                            (n_outputs, "n_outputs")):
            _check_size(value, name, "MADE")
        self.features, self.n_outputs = features, n_outputs
        d = features
        deg_in = torch.arange(1, d + 1)
        degs = [deg_in]
        for _ in range(layers):
            degs.append((torch.arange(hidden) % max(d - 1, 1)) + 1)
        modules: list[nn.Module] = []
        sizes = [d] + [hidden] * layers
        for k in range(layers):
            mask = (degs[k + 1][:, None] >= degs[k][None, :]).float()
            # in place: a linear layer's backward needs its input and weight, not its output
            modules += [_MaskedLinear(sizes[k], sizes[k + 1], mask), nn.ReLU(inplace=True)]
        out_mask = (deg_in[:, None] > degs[-1][None, :]).float().repeat(n_outputs, 1)
        last = _MaskedLinear(sizes[-1], n_outputs * d, out_mask)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        modules.append(last)
        self.net = nn.Sequential(*modules)

    def reference_forward(self, x):
        """MADE in plain PyTorch: each layer multiplies by its masked weight, ReLU between the layers; the
        output (N, n_outputs * D) viewed as (N, n_outputs, D)."""
        h = x
        for layer in self.net:
            h = F.linear(h, layer.weight * layer.mask, layer.bias) if isinstance(layer, _MaskedLinear) \
                else torch.relu(h)
        return h.view(x.shape[0], self.n_outputs, self.features)

    def forward(self, x):
        _check_features(x, self.features, "MADE")
        if not fast_paths.enabled():
            return self.reference_forward(x)
        return torch.stack([h[:, : self.features] for h in self.heads(x)], 1)

    @property
    def head_width(self) -> int:
        """Columns of each head as :meth:`heads` computes it: D, or D rounded up to a multiple of 16 when that
        adds at most 1/16 more. BLAS is much slower for an output width like 63 than for 64 (0.61 vs 0.37 ms
        at batch 8192, 32 hidden units, one thread), more than the padded column costs."""
        d = self.features
        padded = -(-d // 16) * 16
        return padded if (padded - d) * 16 <= d else d

    def heads(self, x, scales=None, reversed_features: bool = False) -> list[torch.Tensor]:
        """The ``n_outputs`` heads as separate contiguous (N, :attr:`head_width`) tensors: columns ``:D`` are
        what ``forward`` stacks, any further columns are exactly 0. Head ``j`` is multiplied by ``scales[j]``
        if given.

        ``reversed_features=True`` computes ``flip(MADE(flip(x)))`` for ``x`` given back to front, by
        reversing the first layer's input columns and the heads' rows (small weight matrices) instead of
        the (N, D) data: a MAF can then skip the reversal between its blocks (see ``MAF.encode``).
        """
        lo, hi, w_first = self._first_layer(reversed_features)
        h = _linear(x[:, lo:hi], w_first, self.net[0].bias)
        for layer in self.net[1:-1]:
            h = layer(h)
        return self.net[-1].forward_chunks(h, self.n_outputs, scales, reverse_out=reversed_features,
                                           width=self.head_width)

    def _first_layer(self, reversed_features: bool):
        """``lo, hi, weight``: the first layer multiplies input columns ``[lo, hi)`` (the used ones; at the
        end when the features come back to front) by ``weight`` (its masked weight, column-flipped then)."""
        first, d = self.net[0], self.features
        k = first.used_inputs
        if reversed_features:
            return d - k, d, first._prepared("flipped", lambda: first.masked_weight().flip(1))
        return 0, k, first.masked_weight()

    def fused_parameters(self, scales, reversed_features: bool = False):
        """``lo, hi, params`` for :class:`fused.MadeAffineFn`, which computes what :meth:`heads` computes (two
        heads): the input columns ``[lo, hi)`` the first layer multiplies, then every hidden layer's masked
        weight and bias and the two heads' prepared weights and biases."""
        lo, hi, w_first = self._first_layer(reversed_features)
        params = [w_first, self.net[0].bias]

        def all_inputs(layer, w):
            # the node multiplies a layer's whole input; only for D = 1 (every unit of degree 1, which no
            # output may see) does a layer leave inputs unused, and their weight columns are then zero
            extra = layer.in_features - layer.used_inputs
            return F.pad(w, (0, extra)) if extra else w

        for layer in self.net[2:-1:2]:
            params += [all_inputs(layer, layer.masked_weight()), layer.bias]
        last = self.net[-1]
        weights, biases = last.chunk_parameters(self.n_outputs, scales, reverse_out=reversed_features,
                                                width=self.head_width)
        weights = [all_inputs(last, w) for w in weights]
        for w, b in zip(weights, biases):
            params += [w, b]
        return lo, hi, params


class MaskedAffineAutoregressive(nn.Module):
    """MAF's masked affine autoregressive transform (Eq. 10).

    Decode: ``x_i = u_i * exp(alpha_i) + mu_i`` with ``(mu_i, alpha_i) = MADE(x_{1:i-1})``.
    Encode (one pass): ``u = (x - mu(x)) * exp(-alpha(x))``, log-det ``-sum(alpha)``.
    Decode is sequential over the D features (D MADE passes). ``alpha`` is soft-clamped to
    ``(-clamp, clamp)`` with ``clamp * tanh(alpha / clamp)`` for stability.
    """

    def __init__(self, features: int, hidden: int = 32, layers: int = 2, clamp: float = 5.0):
        super().__init__()
        self.features = features
        self.made = MADE(features, hidden, layers, n_outputs=2)
        self.clamp = clamp

    def forward(self, x, reversed_features: bool = False):
        """Encode ``x``; with ``reversed_features=True``, ``x`` holds the features back to front and so does
        the result (``flip(forward(flip(x)))``, computed without touching the data's order)."""
        _check_features(x, self.features, "MaskedAffineAutoregressive")
        if not fast_paths.enabled():
            return self.reference_forward(x, reversed_features)
        # the heads come out of the last layer already multiplied by -1 and 2 / clamp (see the Fn)
        scales = (-1.0, 2.0 / self.clamp)
        if torch.is_grad_enabled():
            lo, hi, params = self.made.fused_parameters(scales, reversed_features)
            return fused.MadeAffineFn.apply(x, lo, hi, self.clamp, *params)
        neg_mu, r = self.made.heads(x, scales=scales, reversed_features=reversed_features)
        # evaluation: the same arithmetic in place in the freshly computed heads
        s = r.sigmoid_()
        c2 = self.clamp * fused.LOG2_E
        neg_alpha2 = torch.add(s.new_tensor(c2), s, alpha=-2.0 * c2, out=s)
        logdet = neg_alpha2.sum(1).mul_(fused.LN_2)
        scale = neg_alpha2.exp2_()
        d = x.shape[1]
        if neg_mu.shape[1] == d:
            return torch.add(x, neg_mu, out=neg_mu).mul_(scale), logdet
        return torch.add(x, neg_mu[:, :d], out=scratch.out(x.shape, x)).mul_(scale[:, :d]), logdet

    def reference_forward(self, x, reversed_features: bool = False):
        """Eq. 10 in plain PyTorch: ``(mu, r) = MADE(x)``, ``alpha = clamp * tanh(r / clamp)``,
        ``u = (x - mu) * exp(-alpha)``, ``log|det J| = -sum(alpha)``; ``reversed_features``:
        ``flip(forward(flip(x)))``."""
        if reversed_features:
            u, logdet = self.reference_forward(x.flip(1))
            return u.flip(1), logdet
        mu, r = self.made.reference_forward(x).unbind(1)
        alpha = self.clamp * torch.tanh(r / self.clamp)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(1)

    def reference_inverse(self, u):
        """Decoding in plain PyTorch, one feature at a time: ``x_i = u_i * exp(alpha_i) + mu_i`` with MADE run
        on the features decoded so far (D whole passes); log-det ``sum(alpha)``."""
        columns, alpha_sum = [], 0
        for i in range(self.features):
            x = torch.stack(columns + [torch.zeros_like(u[:, 0])] * (self.features - i), 1)
            mu, r = self.made.reference_forward(x)[:, :, i].unbind(1)
            alpha = self.clamp * torch.tanh(r / self.clamp)
            columns.append(u[:, i] * torch.exp(alpha) + mu)
            alpha_sum = alpha_sum + alpha
        return torch.stack(columns, 1), alpha_sum

    def inverse(self, u):
        """Decode one feature at a time. Output ``i`` of MADE sees only inputs ``< i``, so rather than running
        the whole network D times on the partly decoded vector, each step adds the one new input to the first
        layer's pre-activation (a rank-one update), recomputes the hidden layers, and evaluates only output
        ``i``'s two rows of the last layer. Gradients flow through every step (SKD needs them)."""
        _check_features(u, self.features, "MaskedAffineAutoregressive")
        if not fast_paths.enabled():
            return self.reference_inverse(u)
        net = self.made.net
        first, last = net[0], net[-1]
        d, k = self.features, 2.0 / self.clamp
        w_first = first.masked_weight()
        w_last = last.masked_weight().view(2, d, -1) * torch.tensor([1.0, k], dtype=u.dtype,
                                                                     device=u.device).view(2, 1, 1)
        b_last = last.bias.view(2, d) * torch.tensor([[1.0], [k]], dtype=u.dtype, device=u.device)
        pre = first.bias.expand(u.shape[0], -1)
        columns, alpha_sum = [], 0
        for i in range(d):
            if 0 < i <= first.used_inputs:
                pre = torch.addr(pre, columns[i - 1], w_first[:, i - 1])
            h = torch.relu(pre)
            for layer in net[2:-1]:
                h = layer(h)
            mu, r = torch.addmm(b_last[:, i], h, w_last[:, i].T).unbind(1)
            alpha = torch.sigmoid(r) * (2.0 * self.clamp) - self.clamp
            columns.append(torch.addcmul(mu, u[:, i], torch.exp(alpha)))
            alpha_sum = alpha_sum + alpha
        return torch.stack(columns, 1), alpha_sum


class BatchNormFlow(nn.Module):
    """Batch normalisation as a bijector (MAF paper, section 3.3).

    ``y = (x - m) / sqrt(v + eps) * exp(log_gamma) + beta``. In training mode ``m, v`` are the batch
    statistics (and update running averages); in eval mode the running averages are used, so the
    layer is a fixed affine map. ``inverse`` always uses the running averages. A training-mode batch whose
    statistics are not finite (NaN or inf values) raises ``ValueError`` before the running averages change.
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        _check_size(features, "features", "BatchNormFlow")
        self.features, self.momentum, self.eps = features, momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, x, reversed_features: bool = False):
        """Normalise ``x``; ``reversed_features=True``: ``x`` (and the result) hold the features back to
        front."""
        _check_features(x, self.features, "BatchNormFlow")
        if x.dim() != 2:
            raise ValueError("BatchNormFlow works on tabular (N, D) input")
        if not fast_paths.enabled():
            return self.reference_forward(x, reversed_features)
        order = (lambda v: v.flip(0)) if reversed_features else (lambda v: v)
        if self.training and x.shape[0] > 1:
            y, logdet, mean, var = fused.BatchNormFn.apply(x, order(self.log_gamma), order(self.beta),
                                                           self.eps)
            self._update_running(x, order(mean), order(var))
            return y, logdet.expand(x.shape[0])
        def make():
            log_scale = order(self.log_gamma - 0.5 * torch.log(self.running_var + self.eps))
            scale = torch.exp(log_scale)
            return scale, order(self.beta) - order(self.running_mean) * scale, log_scale.sum()

        state = (self.log_gamma, self.beta, self.running_mean, self.running_var)
        scale, shift, logdet = _cached_without_grad(self, ("affine", reversed_features), state, make)
        y = torch.addcmul(shift, x, scale, out=scratch.out(x.shape, x))  # one pass over x
        return y, logdet.expand(x.shape[0])

    def _update_running(self, x, mean, var) -> None:
        """Move the running averages towards the batch's ``mean`` and ``var`` (features in data order)."""
        # two (D,) vectors: NaN or inf anywhere in x shows in them. Checked before the running averages
        # change, so a bad batch cannot poison them
        if not _all_finite(mean + var):
            _check_batch(x, "BatchNormFlow (training mode)")  # names NaN / inf if that is the cause
            raise NonFiniteBatchError("BatchNormFlow (training mode): the batch's mean / variance "
                                      "overflow (values too large for the dtype); the running statistics "
                                      "were kept")
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)

    def reference_forward(self, x, reversed_features: bool = False):
        """Batch norm in plain PyTorch: ``y = (x - m) / sqrt(v + eps) * exp(log_gamma) + beta``, log-det
        ``sum(log_gamma - log(v + eps) / 2)``, with the batch's mean and (biased) variance in training mode
        (updating the running averages) and the running averages otherwise; ``reversed_features``:
        ``flip(forward(flip(x)))``."""
        if reversed_features:
            y, logdet = self.reference_forward(x.flip(1))
            return y.flip(1), logdet
        if self.training and x.shape[0] > 1:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            self._update_running(x, mean, var)
        else:
            mean, var = self.running_mean, self.running_var
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        return (x - mean) * torch.exp(log_scale) + self.beta, log_scale.sum().expand(x.shape[0])

    def inverse(self, y):
        _check_features(y, self.features, "BatchNormFlow")
        var = self.running_var + self.eps
        x = (y - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(var) + self.running_mean
        logdet = -(self.log_gamma - 0.5 * torch.log(var)).sum()
        return x, logdet.expand(y.shape[0])


def dequantize(x: torch.Tensor, bins: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation: integer pixel values in ``{0..bins-1}`` -> ``(x + u) / bins`` in [0, 1).

    The density of the continuous ``x + u`` on ``[0, bins)^D`` is the density on [0, 1)^D times
    ``bins^-D``; :func:`flowlib.distill.bits_per_dim` accounts for that constant.
    """
    if generator is None:
        u = torch.rand_like(x, dtype=torch.get_default_dtype() if not x.is_floating_point() else x.dtype)
    else:
        u = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
        u = u.to(x.dtype if x.is_floating_point() else torch.get_default_dtype())
    return (x.to(u.dtype) + u) / bins


class ImagePreprocess(nn.Module):
    """Map dequantised images in [0, 1) to the model's input space, with its log-det.

    ``kind="glow"``: ``y = x - 0.5`` (GLOW's x/256 - 0.5 once :func:`dequantize` divided by 256),
    log-det 0. ``kind="logit"``: ``y = logit(alpha + (1 - 2 alpha) x)`` (RealNVP), whose log-det is
    ``sum(log(1 - 2 alpha) - log(s) - log(1 - s))`` with ``s = alpha + (1 - 2 alpha) x``.
    """

    def __init__(self, kind: str = "glow", alpha: float = 0.05):
        super().__init__()
        if kind not in ("glow", "logit"):
            raise ValueError(f"unknown image preprocessing {kind!r}; choose 'glow' or 'logit'")
        self.kind, self.alpha = kind, alpha

    def forward(self, x):
        if self.kind == "glow":
            return x - 0.5, x.new_zeros(x.shape[0])
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        logdet = math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)
        return y, _sum_except_batch(logdet)

    def inverse(self, y):
        if self.kind == "glow":
            return y + 0.5, y.new_zeros(y.shape[0])
        s = torch.sigmoid(y)
        x = (s - self.alpha) / (1 - 2 * self.alpha)
        logdet = -(math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s))
        return x, _sum_except_batch(logdet)
