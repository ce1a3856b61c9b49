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

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "BatchNormFlow",
    "ImagePreprocess",
    "InvertibleConv1x1",
    "InvertibleLinear",
    "MADE",
    "MaskedAffineAutoregressive",
    "Permute",
    "Reverse",
    "Split",
    "Squeeze",
    "dequantize",
]


def _sum_except_batch(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


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
    the identity. Works on (N, C) and (N, C, H, W).
    """

    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        self.features = features
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False) if x.numel() // x.shape[1] > 1 else torch.ones_like(mean)
        self.bias.copy_(mean)
        self.log_scale.copy_(torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x):
        _check_features(x, self.features, "ActNorm")
        if self.training and not bool(self.initialized):
            self._initialize(x)
        y = (x - _per_feature(self.bias, x)) * _per_feature(torch.exp(-self.log_scale), x)
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
        return self._mix(x, self.weight()), self._logdet(x)

    def inverse(self, y):
        _check_features(y, self.features, type(self).__name__)
        return self._mix(y, torch.linalg.inv(self.weight())), -self._logdet(y)

    @staticmethod
    def _mix(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return F.conv2d(x, w.view(*w.shape, 1, 1))
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


def _coupling_net(in_f: int, out_f: int, hidden: int, image: bool) -> nn.Module:
    """The conditioner of a coupling layer. The last layer starts at zero so the coupling starts as
    the identity map (Glow's zero-initialised output convolution)."""
    if image:
        last = nn.Conv2d(hidden, out_f, 3, padding=1)
        net = nn.Sequential(
            nn.Conv2d(in_f, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last,
        )
    else:
        last = nn.Linear(hidden, out_f)
        net = nn.Sequential(
            nn.Linear(in_f, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), last
        )
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
    """

    def __init__(self, features: int, hidden: int, image: bool = False):
        super().__init__()
        self.features = features
        self.d_a, self.d_b = _split_sizes(features, "AffineCoupling")
        self.net = _coupling_net(self.d_a, 2 * self.d_b, hidden, image)
        self.register_buffer("offset", torch.tensor(2.0))

    def _scale_shift(self, x_a):
        h = self.net(x_a)
        shift, raw = h[:, 0::2], h[:, 1::2]
        log_scale = F.logsigmoid(raw + self.offset) - F.logsigmoid(self.offset)
        return shift, log_scale

    def forward(self, x):
        _check_features(x, self.features, "AffineCoupling")
        x_a, x_b = x[:, : self.d_a], x[:, self.d_a :]
        shift, log_scale = self._scale_shift(x_a)
        y_b = (x_b + shift) * torch.exp(log_scale)
        return torch.cat([x_a, y_b], dim=1), _sum_except_batch(log_scale)

    def inverse(self, y):
        _check_features(y, self.features, "AffineCoupling")
        y_a, y_b = y[:, : self.d_a], y[:, self.d_a :]
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
        x_a, x_b = x[:, : self.d_a], x[:, self.d_a :]
        y = torch.cat([x_a, x_b + self.net(x_a)], dim=1)
        return y, x.new_zeros(x.shape[0])

    def inverse(self, y):
        _check_features(y, self.features, "AdditiveCoupling")
        y_a, y_b = y[:, : self.d_a], y[:, self.d_a :]
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


class _MaskedLinear(nn.Linear):
    def __init__(self, in_f: int, out_f: int, mask: torch.Tensor):
        super().__init__(in_f, out_f)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015).

    Output ``i`` (for every one of ``n_outputs`` heads) depends only on inputs ``< i`` in the given
    ``order`` (default natural order). Hidden units get degrees ``1..D-1`` assigned cyclically, so the
    layout is deterministic. Returns a tensor of shape (N, n_outputs, D).
    """

    def __init__(self, features: int, hidden: int = 32, layers: int = 2, n_outputs: int = 2):
        super().__init__()
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
            modules += [_MaskedLinear(sizes[k], sizes[k + 1], mask), nn.ReLU()]
        out_mask = (deg_in[:, None] > degs[-1][None, :]).float().repeat(n_outputs, 1)
        last = _MaskedLinear(sizes[-1], n_outputs * d, out_mask)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        modules.append(last)
        self.net = nn.Sequential(*modules)

    def forward(self, x):
        _check_features(x, self.features, "MADE")
        return self.net(x).view(x.shape[0], self.n_outputs, self.features)


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

    def _params(self, x):
        h = self.made(x)
        mu, alpha = h[:, 0], h[:, 1]
        return mu, self.clamp * torch.tanh(alpha / self.clamp)

    def forward(self, x):
        _check_features(x, self.features, "MaskedAffineAutoregressive")
        mu, alpha = self._params(x)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(dim=1)

    def inverse(self, u):
        _check_features(u, self.features, "MaskedAffineAutoregressive")
        x = torch.zeros_like(u)
        for i in range(self.features):
            mu, alpha = self._params(x)
            x = x.clone()
            x[:, i] = u[:, i] * torch.exp(alpha[:, i]) + mu[:, i]
        mu, alpha = self._params(x)
        return x, alpha.sum(dim=1)


class BatchNormFlow(nn.Module):
    """Batch normalisation as a bijector (MAF paper, section 3.3).

    ``y = (x - m) / sqrt(v + eps) * exp(log_gamma) + beta``. In training mode ``m, v`` are the batch
    statistics (and update running averages); in eval mode the running averages are used, so the
    layer is a fixed affine map. ``inverse`` always uses the running averages.
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.features, self.momentum, self.eps = features, momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, x):
        _check_features(x, self.features, "BatchNormFlow")
        if x.dim() != 2:
            raise ValueError("BatchNormFlow works on tabular (N, D) input")
        if self.training and x.shape[0] > 1:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean) / torch.sqrt(var + self.eps) * torch.exp(self.log_gamma) + self.beta
        logdet = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return y, logdet.expand(x.shape[0])

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
