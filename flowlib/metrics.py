"""Evaluation metrics: test log-likelihood (Table 1), bits/dim (Table 4), timing and size (Table 2),
seed aggregation, and FID (Tables 4 and 6; implemented in :mod:`flowlib.fid`, re-exported here).

All model evaluations run under ``torch.inference_mode`` with the model in eval mode (so BatchNorm
uses running averages and ActNorm does not initialise); every module's previous mode is restored
afterwards. Per-sample log-likelihoods come from ``model.log_prob`` (nats, Eq. 1-3).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .bijectors import cached_weights
from .fid import (
    FEATURE_DIM,
    FIDResult,
    cached_real_features,
    feature_statistics,
    fid,
    fid_from_features,
    frechet_distance,
    inception_features,
    load_inception,
    to_pixels,
)
from .models import count_parameters

__all__ = [
    "FEATURE_DIM",
    "FIDResult",
    "bits_per_dim_from_logprob",
    "cached_real_features",
    "eval_mode",
    "feature_statistics",
    "fid",
    "fid_from_features",
    "format_cell",
    "frechet_distance",
    "inception_features",
    "load_inception",
    "log_prob_batched",
    "mean_std",
    "parameter_count_k",
    "sample_fid",
    "student_teacher_ratios",
    "test_bits_per_dim",
    "test_log_likelihood",
    "time_inference",
    "to_pixels",
]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put every submodule in eval mode; restore each one's own previous mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _batched(model, x: torch.Tensor, batch_size: int, fn, progress: bool, desc: str) -> torch.Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty test set")
    device = _model_device(model)
    out = []
    with eval_mode(model), torch.inference_mode(), cached_weights(model):
        for start in tqdm(range(0, x.shape[0], batch_size), desc=desc, disable=not progress):
            xb = x[start:start + batch_size].to(device)
            out.append(fn(xb).detach().to("cpu", torch.float64))
    return torch.cat(out)


def log_prob_batched(model, x: torch.Tensor, batch_size: int = 1024, progress: bool = False) -> torch.Tensor:
    """Per-sample ``model.log_prob(x)`` in nats, (N,) float64 on CPU, evaluated in batches."""
    return _batched(model, x, batch_size, model.log_prob, progress, "log-likelihood")


def _mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    v = values.to(torch.float64)
    n = v.numel()
    mean = float(v.mean())
    stderr = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, stderr


def test_log_likelihood(model, x: torch.Tensor, batch_size: int = 1024,
                        progress: bool = False) -> tuple[float, float]:
    """Average test log-likelihood in nats (Table 1) and its standard error ``std / sqrt(N)``.

    ``log p(x)`` per sample is Eq. 1-3 (``model.log_prob``); the whole of ``x`` is evaluated in
    batches. The standard error uses the sample std (ddof=1); it is NaN for a single sample.
    """
    return _mean_stderr(log_prob_batched(model, x, batch_size, progress))


test_log_likelihood.__test__ = False  # not a pytest test despite its name


def bits_per_dim_from_logprob(logp, dim: int, preprocess_logdet=0.0, bins: int = 256):
    """Bits per dimension of discrete pixels from the model-space log-density (Table 4).

    ``bpd = -(log p(y) + logdet_pre - D ln(bins)) / (D ln 2)``, where ``log p(y)`` is the model's
    log-density (nats) of the preprocessed image ``y``, ``logdet_pre = log|det dy/dx|`` of the
    preprocessing from the dequantised image ``x`` in [0, 1)^D (0 for GLOW's ``y = x - 0.5``), and
    ``-D ln(bins)`` turns the density on [0, 1)^D into one on [0, bins)^D (uniform dequantisation).
    Works element-wise on floats, numpy arrays and tensors.
    """
    if dim < 1 or bins < 2:
        raise ValueError(f"dim must be >= 1 and bins >= 2, got dim={dim}, bins={bins}")
    return -(logp + preprocess_logdet - dim * math.log(bins)) / (dim * math.log(2.0))


def test_bits_per_dim(model, y: torch.Tensor, preprocess=None, batch_size: int = 256, bins: int = 256,
                      progress: bool = False) -> tuple[float, float]:
    """Mean bits/dim over a test set of model-space images ``y`` and its standard error.

    ``y = preprocess(dequantize(x))``. ``logdet_pre(y)`` is minus the log-det that
    ``preprocess.inverse(y)`` returns (``ImagePreprocess``; ``None`` means GLOW's shift, log-det 0).
    Per sample: :func:`bits_per_dim_from_logprob`; then mean and ``std / sqrt(N)``.
    """
    dim = math.prod(y.shape[1:])

    def per_sample(yb):
        logp = model.log_prob(yb)
        ld = 0.0 if preprocess is None else -preprocess.inverse(yb)[1]
        return bits_per_dim_from_logprob(logp, dim, ld, bins)

    return _mean_stderr(_batched(model, y, batch_size, per_sample, progress, "bits/dim"))


test_bits_per_dim.__test__ = False


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN for one value) and count of per-seed results."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return float(v.mean()), std, int(v.size)


def format_cell(values, digits: int = 3) -> str:
    """A table cell ``"mean ± std (n=k)"`` over seeds, e.g. ``"0.123 ± 0.004 (n=3)"``.

    A single number gives ``"0.123 (n=1)"``; ``None`` or an empty list gives the paper's ``"-"``.
    """
    if values is None:
        return "-"
    if isinstance(values, (int, float, np.floating, np.integer)):
        values = [values]
    values = list(values)
    if not values:
        return "-"
    mean, std, n = mean_std(values)
    if n == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def parameter_count_k(model: torch.nn.Module) -> float:
    """Number of trainable parameters in thousands (Table 2's "Params (K)")."""
    return count_parameters(model) / 1000.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_inference(model, x: torch.Tensor, repeats: int = 20, warmup: int = 3,
                   progress: bool = False) -> dict[str, float]:
    """Wall-clock time of one batch ``x`` (Table 2), in milliseconds, after ``warmup`` untimed passes.

    * encode = density evaluation, ``model.log_prob(x)``;
    * decode = sampling, ``model.decode(z)`` with ``z = model.encode(x).z`` (so the batch and shapes
      match; decoding cost does not depend on the values of z).

    Both run ``repeats`` times under ``torch.inference_mode`` in eval mode; returns the mean and sample
    std over repeats (``encode_ms_mean``, ``encode_ms_std``, ``decode_ms_mean``, ``decode_ms_std``) plus
    ``batch_size`` and ``repeats``. CUDA is synchronised around each timed call.
    """
    if repeats < 2 or warmup < 0:
        raise ValueError(f"need repeats >= 2 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = _model_device(model)
    x = x.to(device)
    result: dict[str, float] = {"batch_size": float(x.shape[0]), "repeats": float(repeats)}
    with eval_mode(model), torch.inference_mode(), cached_weights(model):
        z = model.encode(x).z
        for name, fn in (("encode", lambda: model.log_prob(x)), ("decode", lambda: model.decode(z))):
            for _ in range(warmup):
                fn()
            times = []
            for _ in tqdm(range(repeats), desc=f"timing {name}", disable=not progress):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times.append((time.perf_counter() - t0) * 1000.0)
            t = np.asarray(times)
            result[f"{name}_ms_mean"] = float(t.mean())
            result[f"{name}_ms_std"] = float(t.std(ddof=1))
    return result


def student_teacher_ratios(student: Mapping[str, float], teacher: Mapping[str, float],
                           keys: Iterable[str] | None = None) -> dict[str, float]:
    """``student[k] / teacher[k]`` for each key (default: the numeric keys both share, except std,
    batch size and repeat counts), e.g. the time and parameter fractions the paper discusses."""
    if keys is None:
        skip = ("_std", "batch_size", "repeats")
        keys = [k for k in student if k in teacher and not any(k.endswith(s) for s in skip)
                and isinstance(student[k], (int, float)) and isinstance(teacher[k], (int, float))]
    out = {}
    for k in keys:
        if k not in student or k not in teacher:
            raise KeyError(f"key {k!r} is missing from the student or teacher statistics")
        if teacher[k] == 0:
            raise ZeroDivisionError(f"teacher value for {k!r} is 0")
        out[k] = float(student[k]) / float(teacher[k])
    return out


def sample_fid(model, n_samples: int, temperature: float = 1.0, *, seed: int = 0, preprocess=None,
               sample_batch_size: int = 256, progress: bool = True, **fid_kwargs) -> FIDResult:
    """FID of ``n_samples`` model samples at ``temperature`` (Table 4), decoded in batches.

    The noise comes from a CPU ``torch.Generator`` seeded with ``seed``; decoding runs under
    ``torch.inference_mode`` in eval mode; samples become pixels by :func:`flowlib.fid.to_pixels`
    (``preprocess`` as there). ``fid_kwargs`` go to :func:`flowlib.fid.fid` (it needs ``real_images``
    or ``real_features``; pass ``dataset=`` to cache the real features).
    """
    if n_samples < 2:
        raise ValueError(f"FID needs at least 2 samples, got {n_samples}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    with eval_mode(model), torch.inference_mode(), cached_weights(model):
        for start in tqdm(range(0, n_samples, sample_batch_size), desc="sampling", disable=not progress):
            k = min(sample_batch_size, n_samples - start)
            out.append(to_pixels(model.sample(k, temperature=temperature, generator=gen).cpu(), preprocess))
    fid_kwargs.setdefault("progress", progress)
    return fid(torch.cat(out), **fid_kwargs)


def paired_interval(baseline: Sequence[float], treated: Sequence[float], level: float = 0.95) -> dict:
    """Mean of ``treated[i] - baseline[i]`` over paired seeds, its standard error and the two-sided
    ``level`` confidence interval from Student's t with ``n - 1`` degrees of freedom (no bounds, None, for
    n < 2)."""
    from scipy import stats

    if len(baseline) != len(treated) or not baseline:
        raise ValueError(f"need paired, non-empty runs; got {len(baseline)} and {len(treated)}")
    diffs = [float(t) - float(b) for b, t in zip(baseline, treated)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:  # no spread to estimate: no interval (None, which JSON keeps as null)
        return {"n": n, "mean": mean, "se": None, "low": None, "high": None, "level": level}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return {"n": n, "mean": mean, "se": se, "low": mean - half, "high": mean + half, "level": level}


def paired_p_value(ci: dict) -> float | None:
    """Two-sided p-value of the paired t-test behind a :func:`paired_interval` (the probability, with no
    true difference, of a mean paired difference at least this far from zero); None for n < 2."""
    from scipy import stats

    if ci["se"] is None:
        return None
    if ci["se"] == 0:
        return 1.0 if ci["mean"] == 0 else 0.0
    return float(2 * stats.t.sf(abs(ci["mean"]) / ci["se"], ci["n"] - 1))


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (in their order): the family-wise error rate of calling
    every adjusted p below alpha significant is at most alpha, whatever the dependence between the tests.
    The i-th smallest p (1-based) is multiplied by m - i + 1, capped at 1, and made non-decreasing."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def interval_verdict(ci: dict) -> str:
    """What a :func:`paired_interval` of distilled − plain (higher is better) says, in words: "helps" only
    when the whole interval is above zero, "hurts" when below, and no claim from one seed."""
    if ci["low"] is None:
        return "one seed: no claim"
    level = round(100 * ci["level"])
    if ci["low"] > 0:
        return f"helps ({level}% interval above 0)"
    if ci["high"] < 0:
        return f"hurts ({level}% interval below 0)"
    return "no effect beyond the noise"

