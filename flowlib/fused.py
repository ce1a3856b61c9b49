"""flowlib's fast paths, kept apart from the readable layers of :mod:`flowlib.bijectors` (a reader can skip
this module): autograd nodes with hand-written backward passes that fuse a layer's work
(:class:`AffineCouplingFn`, :class:`MadeAffineFn`, :class:`BatchNormFn`, :class:`SelfNormDenseFn`), the image
path's faster layouts (:func:`mix_channels`, :func:`channels_last_conv_stack`, :class:`ContiguousHalvesFn`),
and the cache of weight-derived tensors behind :func:`cached_weights`. Every layer also has a plain PyTorch
reference (its ``reference_forward``; ``with flowlib.fast_paths.disabled():`` runs every layer on it), and
``tests/test_reference_paths.py`` checks that both paths compute the same values and gradients.

The fused nodes are gradchecked in ``tests/test_fast_paths.py``; why each exists (what it saves, measured) is
in its docstring and in ``benchmarks/README.md``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_paths

__all__ = ["AffineCouplingFn", "BatchNormFn", "LN_2", "LOG2_E", "MadeAffineFn", "SelfNormDenseFn",
           "ContiguousHalvesFn", "cached_weights", "channels_last_conv_stack", "mix_channels", "transposed"]

LOG2_E = 1.0 / math.log(2.0)
LN_2 = math.log(2.0)


# Modules inside a :func:`cached_weights` block -> their derived-weight cache, key -> (stamp, value). Held
# weakly and outside the module, so that a copy of the module (``copy.deepcopy``, ``AveragedModel``, pickling)
# never carries an active cache with it.
_WEIGHT_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def cached_weights(model: nn.Module):
    """Context manager for evaluating a model whose weights are fixed: ``with cached_weights(model): ...``.

    **Inside the block, the weights of ``model`` are promised not to change.** The tensors each layer derives
    from its weights (the LU matrix ``W`` and ``W^-1``, MADE's masked / scaled / flipped / padded weights,
    batch norm's evaluation-mode affine map, a self-normalizing layer's exact log-det) are then computed
    once, on their first use without gradients, and reused by every later pass in the block; on leaving the
    block they are dropped. Outside such a block (the default) they are recomputed on every call, which is
    always correct however the weights change (an optimizer step, ``load_state_dict``, ``p.copy_``, a write
    through ``p.data``, ``torch.nn.utils.vector_to_parameters``, an EMA update).

    The results inside equal those outside; only the repeated small operations are saved: for a 6-block MAF
    about 0.7 ms per ``log_prob`` (40% of a batch of 512, 5-10% of a batch of 8192), for a 3-step tabular
    Glow 0.1-0.2 ms (10-15% at 512, 3-4% at 8192), single-threaded CPU. Worth it wherever a fixed model is
    evaluated many times (test-set likelihoods, sampling loops, a frozen teacher during distillation). With
    gradients enabled nothing is cached (autograd must see the computation). As a safeguard, a weight moved
    to another device or dtype, or changed in place by an operation autograd tracks (an optimizer step,
    ``load_state_dict``), is still noticed; a write through ``.data`` is not (that is the promise). Blocks
    nest; a copy of the model made inside the block is not cached. Yields ``model``.
    """
    entered = []
    for module in model.modules():
        if module not in _WEIGHT_CACHES:
            _WEIGHT_CACHES[module] = {}
            entered.append(module)
    try:
        yield model
    finally:
        for module in entered:
            _WEIGHT_CACHES.pop(module, None)


def _cached_without_grad(module: nn.Module, key, tensors, make):
    """``make()``: a tensor (or tuple of tensors) derived from the weights ``tensors`` of ``module``.

    Recomputed on every call, unless ``module`` is inside a :func:`cached_weights` block and gradients are
    off: then the value of the first call is reused while each of ``tensors`` keeps its version, storage and
    dtype. (Those alone cannot tell a write through ``.data``, which has its own version counter: that is why
    reuse needs the explicit promise of :func:`cached_weights`.) For the small weight-derived tensors whose
    dozens of tiny ops per call cost more than the arithmetic at small batches."""
    cache = _WEIGHT_CACHES.get(module) if _WEIGHT_CACHES and fast_paths.enabled() else None
    if cache is None or torch.is_grad_enabled() or tensors[0].device.type == "meta":
        return make()
    stamp = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        hit = cache[key] = (stamp, make())
    return hit[1]


def mix_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight.view(C, C, 1, 1), bias)`` (GLOW's invertible 1x1 convolution, Eq. 7) as one
    batched matrix product: every image's (C, H W) pixels multiplied by the same (C, C) ``weight``. For the
    few channels of GLOW's mixing layers the convolution kernels spend most of their time outside the
    arithmetic: forward and backward of the product took 0.13 ms against the convolution's 0.37 ms on
    (64, 4, 8, 8), 0.49 against 1.79 ms on (64, 12, 16, 16) (2 threads, ``benchmarks/README.md``)."""
    n, c = x.shape[:2]
    if n == 0 or x.dtype not in (torch.float32, torch.float64):
        return F.conv2d(x, weight.view(*weight.shape, 1, 1), bias)
    pixels = x.reshape(n, c, -1)
    w = weight.expand(n, *weight.shape)  # (no copy; its gradient is summed over the batch)
    out = torch.bmm(w, pixels) if bias is None else torch.baddbmm(bias.view(1, -1, 1), w, pixels)
    return out.view(n, weight.shape[0], *x.shape[2:])


def channels_last_conv_stack(layers, x: torch.Tensor) -> torch.Tensor:
    """``layers`` (convolutions and activations, applied in order) run on ``x`` in channels-last memory format
    (the same values; oneDNN's channels-last convolution kernels are faster for the coupling networks'
    shapes, ``benchmarks/README.md``). The result is left channels-last: hand it on through
    :class:`ContiguousHalvesFn`, so that its gradient comes back channels-last too (an elementwise kernel such
    as ReLU's backward on one channels-last and one contiguous operand runs ~25x slower than on two of the
    same layout)."""
    h = x.contiguous(memory_format=torch.channels_last)
    for layer in layers:
        h = layer(h)
    return h


class ContiguousHalvesFn(torch.autograd.Function):
    """``y.chunk(2, dim=1)`` as two contiguous tensors, with ``y``'s gradient returned in ``y``'s own memory
    format (channels-last for :func:`channels_last_conv_stack`'s networks) instead of the contiguous layout
    autograd would hand back."""

    @staticmethod
    def forward(ctx, y):
        ctx.channels_last = y.dim() == 4 and not y.is_contiguous() and \
            y.is_contiguous(memory_format=torch.channels_last)
        return tuple(t.contiguous() for t in y.chunk(2, dim=1))

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        grad = torch.cat([grad_a, grad_b], dim=1)
        return grad.contiguous(memory_format=torch.channels_last) if ctx.channels_last else grad


class AffineCouplingFn(torch.autograd.Function):
    """The elementwise half of :class:`AffineCoupling` in one autograd node:
    ``y_b = (x_b + shift) * s / sigmoid(2)`` with ``s = sigmoid(raw + 2)`` and
    ``logdet = sum(log(s)) - n * logsigmoid(2)`` (sum over all but the batch dimension).

    Backward by hand: ``dy/dx_b = dy/dshift = scale``; ``d scale / d raw = scale (1 - s)`` and
    ``d logsigmoid(t) / dt = 1 - s``, so ``dL/draw = (g_y * y + g_logdet) * (1 - s)``.
    """

    @staticmethod
    def compute(x_b, shift, raw, offset: float, in_place: bool = False):
        """``y_b, logdet, s, scale``; ``in_place`` reuses ``raw`` and ``shift`` (evaluation only), with the
        very same arithmetic, so both paths agree bit for bit."""
        t = raw.add_(offset) if in_place else raw + offset
        log_sigmoid_offset = -math.log1p(math.exp(-offset))  # in double precision, whatever the dtype
        s = t.sigmoid_()
        # log(sigmoid(t)) from the sigmoid already needed for the scale: one fast vectorised log instead of
        # the CPU logsigmoid kernel (5x slower). It equals logsigmoid(t) unless s underflows to 0
        # (t < -87 in float32), where the scale itself is 0, the layer singular and logdet -inf, which
        # training reports as divergence.
        logdet = torch.log(s).flatten(1).sum(1) - math.prod(t.shape[1:]) * log_sigmoid_offset
        if in_place:
            scale = s.mul_(math.exp(-log_sigmoid_offset))
            return shift.add_(x_b).mul_(scale), logdet, None, scale
        scale = s * math.exp(-log_sigmoid_offset)
        return torch.add(shift, x_b).mul_(scale), logdet, s, scale

    @staticmethod
    def forward(ctx, x_b, shift, raw, offset: float):
        y, logdet, s, scale = AffineCouplingFn.compute(x_b, shift, raw, offset)
        ctx.save_for_backward(s, scale, y)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        s, scale, y = ctx.saved_tensors
        grad_x = grad_y * scale
        view = (-1,) + (1,) * (y.dim() - 1)
        grad_raw = torch.addcmul(grad_logdet.view(view), grad_y, y).mul_(1.0 - s)
        return grad_x, grad_x, grad_raw, None


class MadeAffineFn(torch.autograd.Function):
    """MADE and Eq. 10's encode step fused into one autograd node (the training path of
    :class:`MaskedAffineAutoregressive`).

    Forward: ``h = relu(x[:, lo:hi] W_1^T + b_1)``, then ``h = relu(h W_l^T + b_l)`` for every further hidden
    layer, the two heads ``-mu = h W_mu^T + b_mu`` and ``r' = h W_r^T + b_r`` (the -1 and ``2 / clamp`` are
    folded into those weights), ``alpha = clamp * tanh(r / clamp)``, ``u = (x + (-mu)) * exp(-alpha)`` and
    ``logdet = -sum_i alpha_i``. ``[lo, hi)`` are the input columns some hidden unit can see
    (:class:`_MaskedLinear`); ``W_1`` multiplies only those.

    Written out by hand because autograd's op-by-op graph makes about twice as many passes over the (N, D)
    tensors, and those passes, not the small matmuls, dominate a MAF training step. In particular x's
    gradient is assembled in one buffer: ``grad_u * exp(-alpha)``, plus the first layer's input gradient
    added in place into columns ``lo:hi`` (autograd would zero-fill an (N, D) tensor for the column slice,
    copy into it and add it to the other path's gradient). ``clamp * tanh(r / clamp)`` is evaluated as
    ``clamp * (2 sigmoid(2 r / clamp) - 1)`` (the same function; the CPU sigmoid kernel is much faster than
    tanh). The heads may be wider than ``x`` (:attr:`MADE.head_width`): their extra columns are exactly 0, so
    ``alpha`` is 0 there and adds nothing to the log-det. Backward of the affine step: ``du/dx = du/d(-mu) =
    exp(-alpha)``, ``du/dalpha = -u``, ``dlogdet/dalpha = -1``, ``dalpha/dr' = 2 clamp s (1 - s)`` with
    ``s = sigmoid(r')``; of each layer the usual linear and ReLU rules.

    ``apply(x, lo, hi, clamp, w_1, b_1, ..., w_L, b_L, w_mu, b_mu, w_r, b_r)``; returns ``u, logdet``.
    """

    @staticmethod
    def forward(ctx, x, lo: int, hi: int, clamp: float, *params):
        *hidden, w_mu, b_mu, w_r, b_r = params
        x_in = x[:, lo:hi]
        h, acts = x_in, [x_in]  # every layer's input
        for w, b in zip(hidden[::2], hidden[1::2]):
            h = torch.addmm(b, h, w.T).relu_()
            acts.append(h)
        neg_mu = torch.addmm(b_mu, h, w_mu.T)
        s = torch.addmm(b_r, h, w_r.T).sigmoid_()
        # -alpha in base-2 units: exp2 is ~3x faster than exp on the CPU
        neg_alpha2 = torch.add(s.new_tensor(clamp * LOG2_E), s, alpha=-2.0 * clamp * LOG2_E)
        logdet = neg_alpha2.sum(1).mul_(LN_2)
        scale = neg_alpha2.exp2_()
        d = x.shape[1]
        u = torch.add(x, neg_mu[:, :d]).mul_(scale[:, :d])
        ds = s.addcmul_(s, s, value=-1.0)  # s (1 - s), in place: backward needs nothing else of s
        ctx.save_for_backward(ds, scale, u, *acts, *hidden[::2], w_mu, w_r)
        ctx.clamp, ctx.lo, ctx.hi, ctx.layers = clamp, lo, hi, len(hidden) // 2
        return u, logdet

    @staticmethod
    def backward(ctx, grad_u, grad_logdet):
        ds, scale, u, *rest = ctx.saved_tensors
        n_layers = ctx.layers
        acts, weights, (w_mu, w_r) = rest[:n_layers + 1], rest[n_layers + 1:2 * n_layers + 1], rest[-2:]
        d = u.shape[1]
        # dL/dr' = -(grad_u * u + grad_logdet) * dalpha/dr',  dalpha/dr' = 2 clamp s (1 - s)
        k = -2.0 * ctx.clamp  # folded into the first pass: (k grad_logdet) + k (grad_u u), then times ds
        row = grad_logdet.unsqueeze(1) * k
        if scale.shape[1] == d:
            grad_mu = grad_u * scale
            grad_r = torch.addcmul(row, grad_u, u, value=k).mul_(ds)
        else:  # padded heads: their extra columns enter the log-det only
            grad_mu = torch.empty_like(ds)
            torch.mul(grad_u, scale[:, :d], out=grad_mu[:, :d])
            grad_mu[:, d:] = 0.0
            grad_r = torch.empty_like(ds)
            grad_r[:, d:] = row
            torch.addcmul(row, grad_u, u, value=k, out=grad_r[:, :d])
            grad_r.mul_(ds)
        weights_need_grad = any(ctx.needs_input_grad[4:])  # not for a frozen teacher
        h = acts[-1]
        grads = [None] * 4
        if weights_need_grad:
            grads = [grad_mu.T @ h, grad_mu.sum(0), grad_r.T @ h, grad_r.sum(0)]
        g = torch.mm(grad_mu, w_mu).addmm_(grad_r, w_r)
        layer_grads = []
        for i in range(n_layers - 1, -1, -1):
            # ReLU's backward from its output (> 0 exactly where the input was)
            g = torch.ops.aten.threshold_backward(g, acts[i + 1], 0.0)
            layer_grads = ([g.T @ acts[i], g.sum(0)] if weights_need_grad else [None, None]) + layer_grads
            if i > 0:
                g = g @ weights[i]
        grad_x = None
        if ctx.needs_input_grad[0]:
            # x's gradient is -mu's (its first d columns), which no later use reads: add the first layer's
            # input gradient to it in place. A separate product then an add, not addmm_: the sum rounds
            # exactly as autograd's accumulation of the two paths did, so training is unchanged bit for bit
            grad_x = grad_mu[:, :d]
            grad_x[:, ctx.lo:ctx.hi] += torch.mm(g, weights[0])
        return (grad_x, None, None, None, *layer_grads, *grads)


class BatchNormFn(torch.autograd.Function):
    """Training-mode batch normalisation with its log-determinant, fused into one autograd node:
    ``y = (x - m) * exp(ls) + beta`` and ``logdet = sum(ls)`` with ``m, v`` the batch mean and (biased)
    variance and ``ls = log_gamma - log(v + eps) / 2``. Both outputs depend on ``x`` through ``m`` and ``v``.
    Returns ``y, logdet, m, v`` (the last two for the running averages; no gradient flows through them).
    """

    @staticmethod
    def forward(ctx, x, log_gamma, beta, eps: float):
        mean = x.mean(0)
        centered = x - mean
        # the mean of squares of the centred batch: much faster than the column-wise var kernel on (N, D)
        var = centered.square().mean(0)
        log_scale = log_gamma - 0.5 * torch.log(var + eps)
        scale = log_scale.exp()
        ctx.save_for_backward(centered, scale, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return torch.addcmul(beta, centered, scale), log_scale.sum(), mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_logdet, _grad_mean, _grad_var):
        centered, scale, var = ctx.saved_tensors
        n = centered.shape[0]
        grad_beta = grad_y.sum(0)
        grad_log_scale = (grad_y * centered).sum(0) * scale + grad_logdet
        grad_var = grad_log_scale * (-0.5 / (var + ctx.eps))
        # dL/dx = g - mean(g) with g = dL/d(centered) = grad_y scale + centered grad_var 2 / n. The batch
        # mean of centered is 0, so mean(g) = scale mean(grad_y) = scale grad_beta / n: no pass over g for it.
        grad_x = torch.addcmul(grad_beta * scale * (-1.0 / n), grad_y, scale)
        grad_x.addcmul_(centered, grad_var * (2.0 / n))
        return grad_x, grad_log_scale, grad_beta, None


_TRANSPOSE_WORKER: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None  # (pid, executor)


def _transpose_worker() -> concurrent.futures.ThreadPoolExecutor:
    """A one-thread executor for :func:`transposed`, made anew in a forked child (whose copy of the parent's
    executor has no thread)."""
    global _TRANSPOSE_WORKER
    if _TRANSPOSE_WORKER is None or _TRANSPOSE_WORKER[0] != os.getpid():
        _TRANSPOSE_WORKER = (os.getpid(), concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="flowlib-transpose"))
    return _TRANSPOSE_WORKER[1]


def transposed(matrices, min_bytes: int = 32 << 20) -> list:
    """Contiguous copies of the transposes of ``matrices`` (a None entry stays None), the same values as
    ``m.T.contiguous()``. torch copies a transposed matrix on one thread, and the page faults of a large
    fresh result come with that copy: glibc maps every block of 32 MB or more (its largest mmap threshold)
    anew and unmaps it when freed, so at D = 4096 each 64 MB copy faults in its pages (47 ms). For matrices
    of ``min_bytes`` or more on the CPU, two are therefore copied side by side, one on a worker thread, when
    torch may use two threads or more, and a single one is zero-filled first (the fill takes the faults on
    every thread). A self-normalizing dense training step at D = 4096 (two such copies): 360-365 ms against
    388-395 with plain copies, the zero-fill alone 370-375 (interleaved, 2 threads). Smaller matrices come
    from the heap already paged in, where either trick only costs time (D = 2048: 94 and 88 against 86 ms)."""
    todo = [m for m in matrices if m is not None]

    def copy(m, fill: bool):
        with torch.no_grad():
            out = torch.empty(m.shape[1], m.shape[0], dtype=m.dtype, device=m.device)
            return (out.zero_() if fill else out).copy_(m.T)

    def large(m):
        return m.device.type == "cpu" and m.numel() * m.element_size() >= min_bytes

    if len(todo) == 2 and torch.get_num_threads() >= 2 and all(large(m) for m in todo):
        first = _transpose_worker().submit(copy, todo[0], False)
        second = copy(todo[1], False)
        done = iter([first.result(), second])
    else:
        done = iter([copy(m, large(m)) for m in todo])
    return [None if m is None else next(done) for m in matrices]


class SelfNormDenseFn(torch.autograd.Function):
    """The training pass of a self-normalizing dense layer (:class:`flowlib.selfnorm.SelfNormLinear`) in one
    autograd node: ``z = W x``, the reconstruction error ``E = mean_n ||R W x_n - x_n||^2`` and the log-det
    (value ``value``, gradients the surrogates ``R^T`` for ``W`` and ``-W^T`` for ``R``).

    ``apply(x, W, R, split, value) -> (z, E, logdet)``. The reference (``SelfNormLinear.reference_forward``)
    builds the same three from :class:`flowlib.selfnorm._SplitLikelihoodMap`, a separate reconstruction
    graph and :class:`flowlib.selfnorm._SelfNormLogdet`: eleven (N, D) x (D, D) products per step (the map
    three times in forward, its recomputation in the split's backward, the reconstruction's own backward)
    and a separate (D, D) gradient per term, summed by autograd. Here, with ``e = R z - x``, ``g_E`` and
    ``g_ld`` the gradients reaching ``E`` and the log-det, ``e' = 2 g_E e / N`` and ``s = 1/2`` (split) or 1:

    * ``dL/dx = dz W`` (the likelihood's; the reconstruction sees ``x`` detached, as in the reference),
    * ``dL/dW = (s dz + e' R)^T x + s g_ld R^T``,
    * ``dL/dR = (e' - [split] dx / 2)^T z - [split] g_ld W^T / 2``,

    six products in all, and one (D, D) gradient per parameter (no accumulation passes). At D = 4096,
    batch 128, the step is several times faster than the reference's (``benchmarks/selfnorm_speed.py``).
    """

    @staticmethod
    def forward(ctx, x, weight, inverse_weight, split: bool, value):
        z = torch.mm(x, weight.T)
        error = torch.mm(z, inverse_weight.T).sub_(x)
        recon = error.square().sum() / x.shape[0]
        ctx.save_for_backward(x, weight, inverse_weight, z, error)
        ctx.split = split
        ctx.set_materialize_grads(False)
        return z, recon, value.clone()

    @staticmethod
    def backward(ctx, grad_z, grad_recon, grad_logdet):
        x, weight, inverse_weight, z, error = ctx.saved_tensors
        share = 0.5 if ctx.split else 1.0
        grad_x = None
        if grad_z is not None and (ctx.needs_input_grad[0] or ctx.split):
            grad_x = torch.mm(grad_z, weight)
        scaled_error = None if grad_recon is None else error * (2.0 * grad_recon / x.shape[0])
        # the gradient reaching z: the likelihood's share and the reconstruction's (e' R)
        dz = None if grad_z is None else grad_z * share
        if scaled_error is not None:
            dz = (torch.mm(scaled_error, inverse_weight) if dz is None
                  else dz.addmm_(scaled_error, inverse_weight))
        # dL/dR = dr^T z with dr = e' - dx / 2 (split): x = R z is the inverse model's map
        dr = scaled_error
        if ctx.split and grad_x is not None:
            dr = grad_x * -0.5 if dr is None else torch.add(dr, grad_x, alpha=-0.5)
        g_ld = 0.0 if grad_logdet is None else float(grad_logdet)
        grad_w = grad_r = None
        # each parameter's gradient starts from the other's transpose (the surrogate log-det's): both copies
        # first, side by side (see transposed), then one product accumulated into each, as addmm would
        r_t, w_t = transposed([inverse_weight if ctx.needs_input_grad[1] and dz is not None else None,
                               weight if ctx.needs_input_grad[2] and dr is not None else None])
        if ctx.needs_input_grad[1]:
            if dz is None:
                grad_w = inverse_weight.T * (share * g_ld)
            else:
                grad_w = r_t.addmm_(dz.T, x, beta=share * g_ld)
        if ctx.needs_input_grad[2]:
            r_ld = -0.5 * g_ld if ctx.split else 0.0
            if dr is None:
                grad_r = weight.T * r_ld
            else:
                grad_r = w_t.addmm_(dr.T, z, beta=r_ld)
        if grad_x is not None and not ctx.needs_input_grad[0]:
            grad_x = None
        return grad_x, grad_w, grad_r, None, None
