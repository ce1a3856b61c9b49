"""Test log-likelihood, bits/dim, seed aggregation, timing and size (flowlib.metrics)."""

import math
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flowlib import metrics
from flowlib.bijectors import ImagePreprocess
from flowlib.fid import fid_from_features, to_pixels
from flowlib.models import MAF, Glow
from tests.flowcheck import perturb


class ColumnModel(nn.Module):
    """log p(x) = x[:, 0]; records the mode it was called in."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.child = nn.Linear(1, 1)
        self.calls = []

    def log_prob(self, x):
        self.calls.append((self.training, self.child.training, torch.is_inference_mode_enabled(), len(x)))
        return x[:, 0] + 0 * self.w


class UniformModel(nn.Module):
    """log p(y) = 0 everywhere (a uniform density of height 1 on a unit-volume cube)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def log_prob(self, y):
        return torch.zeros(y.shape[0], dtype=y.dtype) + 0 * self.w


def test_test_log_likelihood_mean_and_stderr_by_hand():
    model = ColumnModel()
    model.train()
    model.child.eval()
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    mean, stderr = metrics.test_log_likelihood(model, x, batch_size=2)
    # mean 3; sample std sqrt(2.5); stderr sqrt(2.5 / 5) = sqrt(0.5)
    assert mean == pytest.approx(3.0, rel=1e-12) and stderr == pytest.approx(math.sqrt(0.5), rel=1e-12)
    assert [c[3] for c in model.calls] == [2, 2, 1]  # the whole set, in batches
    assert all(c[:3] == (False, False, True) for c in model.calls)  # eval + inference mode
    assert model.training and not model.child.training  # each module's own mode restored


def test_test_log_likelihood_maf_uses_running_stats_and_keeps_them():
    g = torch.Generator().manual_seed(0)
    model = MAF(3, depth=2, hidden=8)
    model.train()
    model.log_prob(torch.randn(64, 3, generator=g) * 2 + 1)  # fills BatchNorm running averages
    perturb(model, 0.05)
    x = torch.randn(50, 3, generator=g)
    bn = model.blocks[0].layers[1]
    before = bn.running_mean.clone()
    mean, stderr = metrics.test_log_likelihood(model, x, batch_size=16)
    assert torch.equal(bn.running_mean, before) and model.training
    model.eval()
    with torch.no_grad():
        lp = model.log_prob(x).double()
    assert mean == pytest.approx(lp.mean().item(), rel=1e-6)
    assert stderr == pytest.approx(lp.std().item() / math.sqrt(50), rel=1e-5)


def test_bits_per_dim_from_logprob_hand_values():
    # a density of height 1 on [0, 1)^D spreads over 256 bins per dimension: 8 bits/dim
    assert metrics.bits_per_dim_from_logprob(0.0, 4) == pytest.approx(8.0)
    # log p = -D ln 2 (half the height): one more bit per dimension
    assert metrics.bits_per_dim_from_logprob(-4 * math.log(2), 4) == pytest.approx(9.0)
    assert metrics.bits_per_dim_from_logprob(0.0, 10, bins=2) == pytest.approx(1.0)
    # the preprocessing log-det enters like log p
    assert metrics.bits_per_dim_from_logprob(1.0, 3, preprocess_logdet=-1.0) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        metrics.bits_per_dim_from_logprob(0.0, 0)


def test_bits_per_dim_logit_preprocessing_by_hand():
    # at y = 0 the logit preprocessing has s = 0.5: log|dy/dx| = log(0.9) - 2 log(0.5) per dimension,
    # so a uniform model-space density gives 8 - 2 - log2(0.9) = 6.152003... bits/dim
    y = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    mean, stderr = metrics.test_bits_per_dim(UniformModel(), y, ImagePreprocess("logit", alpha=0.05))
    assert mean == pytest.approx(6.0 - math.log2(0.9), rel=1e-12) and stderr == pytest.approx(0.0, abs=1e-12)
    mean_glow, _ = metrics.test_bits_per_dim(UniformModel(), y)
    assert mean_glow == pytest.approx(8.0, rel=1e-12)


@pytest.mark.parametrize("kind", ["glow", "logit"])
def test_bits_per_dim_of_tiny_glow_equals_nll_over_d_ln2_plus_constant(kind):
    g = torch.Generator().manual_seed(1)
    model = Glow((1, 4, 4), levels=2, depth=1, hidden=8).double()
    model.train()
    model.log_prob(torch.rand(32, 1, 4, 4, generator=g, dtype=torch.float64) - 0.5)  # ActNorm init
    perturb(model, 0.05, seed=2)
    pre = ImagePreprocess(kind)
    x01 = torch.rand(10, 1, 4, 4, generator=g, dtype=torch.float64)
    y, logdet_fwd = pre(x01)  # forward direction: log|dy/dx|, independent of the inverse used inside
    mean, stderr = metrics.test_bits_per_dim(model, y, None if kind == "glow" else pre, batch_size=4)
    model.eval()
    with torch.no_grad():
        nll = -model.log_prob(y)
    d = 16
    per_sample = (nll - logdet_fwd) / (d * math.log(2)) + 8.0
    assert mean == pytest.approx(per_sample.mean().item(), rel=1e-10)
    assert stderr == pytest.approx(per_sample.std().item() / math.sqrt(10), rel=1e-8)
    if kind == "glow":
        assert torch.allclose(logdet_fwd, torch.zeros(10, dtype=torch.float64))


def test_mean_std_and_format_cell():
    assert metrics.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert metrics.format_cell([0.121, 0.123, 0.125], 3) == "0.123 ± 0.002 (n=3)"
    assert metrics.format_cell([-22.5, -22.7], 2) == "-22.60 ± 0.14 (n=2)"
    assert metrics.format_cell(4.4734, 3) == "4.473 (n=1)"
    assert metrics.format_cell(None) == "-" and metrics.format_cell([]) == "-"
    mean, std, n = metrics.mean_std([5.0])
    assert (mean, n) == (5.0, 1) and math.isnan(std)
    with pytest.raises(ValueError):
        metrics.mean_std([])


def test_parameter_count_k():
    m = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 2))  # 55 + 12 parameters
    assert metrics.parameter_count_k(m) == pytest.approx(0.067)
    m[1].weight.requires_grad_(False)
    assert metrics.parameter_count_k(m) == pytest.approx(0.057)


class SleepyModel(nn.Module):
    """Encode (log_prob) takes ~4 ms, decode ~12 ms; counts calls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.n_logp = self.n_dec = 0
        self.modes = set()

    def encode(self, x):
        return SimpleNamespace(z=[x])

    def log_prob(self, x):
        self.n_logp += 1
        self.modes.add((self.training, torch.is_inference_mode_enabled()))
        time.sleep(0.004)
        return x.sum(1)

    def decode(self, z):
        self.n_dec += 1
        time.sleep(0.012)
        return z[0]


def test_time_inference_measures_each_direction():
    model = SleepyModel()
    out = metrics.time_inference(model, torch.zeros(8, 2), repeats=5, warmup=2)
    assert model.n_logp == 7 and model.n_dec == 7 and model.modes == {(False, True)} and model.training
    assert 4.0 <= out["encode_ms_mean"] < 4.0 + 40 and 12.0 <= out["decode_ms_mean"] < 12.0 + 40
    assert out["decode_ms_mean"] > out["encode_ms_mean"]
    assert out["encode_ms_std"] >= 0 and out["batch_size"] == 8 and out["repeats"] == 5
    with pytest.raises(ValueError):
        metrics.time_inference(model, torch.zeros(8, 2), repeats=1)


def test_time_inference_on_real_flow_runs_both_directions():
    model = MAF(16, depth=2, hidden=8)
    out = metrics.time_inference(model, torch.randn(16, 16), repeats=5, warmup=1)
    assert set(out) >= {"encode_ms_mean", "encode_ms_std", "decode_ms_mean", "decode_ms_std"}
    # MAF decodes sequentially (D = 16 MADE passes per block vs 1 to encode): sampling is much slower
    assert out["decode_ms_mean"] > out["encode_ms_mean"] > 0


def test_student_teacher_ratios():
    student = {"encode_ms_mean": 2.0, "encode_ms_std": 1.0, "params_k": 10.0, "batch_size": 8.0}
    teacher = {"encode_ms_mean": 4.0, "encode_ms_std": 3.0, "params_k": 40.0, "batch_size": 8.0}
    assert metrics.student_teacher_ratios(student, teacher) == {"encode_ms_mean": 0.5, "params_k": 0.25}
    ratios = metrics.student_teacher_ratios(student, teacher, keys=["encode_ms_std"])
    assert ratios == {"encode_ms_std": pytest.approx(1 / 3)}
    with pytest.raises(KeyError):
        metrics.student_teacher_ratios(student, teacher, keys=["missing"])


def test_sample_fid_uses_seeded_samples():
    model = Glow((1, 4, 4), levels=2, depth=1, hidden=8)
    perturb(model, 0.05)
    real = torch.randint(0, 256, (20, 1, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    flat = lambda x: x.reshape(x.shape[0], -1).double().numpy()
    res = metrics.sample_fid(model, 12, temperature=0.7, seed=5, real_images=real, features_fn=flat,
                             progress=False)
    model.eval()
    with torch.no_grad():
        fake = to_pixels(model.sample(12, temperature=0.7, generator=torch.Generator().manual_seed(5)))
    ref = fid_from_features(flat(real), flat(fake))
    assert (res.n_real, res.n_fake) == (20, 12) and res.value == pytest.approx(ref.value, rel=1e-9)
