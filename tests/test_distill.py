"""Tests of flowlib.distill: likelihood metrics and the losses of Eq. 12-15."""

import copy
import math

import pytest
import torch

from flowlib.bijectors import ImagePreprocess, dequantize
from flowlib.distill import (
    PAPER_VS_CODE,
    PRESETS,
    bits_per_dim,
    default_pairs,
    distillation_loss,
    freeze,
    ilkd_loss,
    latent_distance,
    lkd_loss,
    nll,
    skd_loss,
)
from flowlib.models import MAF, Glow
from tests.flowcheck import perturb

LOG_2PI = math.log(2 * math.pi)


def _trained_like(model, x, seed=0):
    """Move parameters off their identity initialisation and run ActNorm's data-dependent init."""
    perturb(model, scale=0.1, seed=seed)
    model.train()
    with torch.no_grad():
        model.encode(x)
    return model


def _tab(n=16, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _img(n=4, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) - 0.5


# ----------------------------------------------------------------------------------------------------
# A 2-D MAF whose latents are computed by hand: zero-initialised MADE outputs mu = alpha = 0 (identity),
# batch norm in eval mode with running mean 0, variance 1, eps 0 is y = x * exp(log_gamma) + beta, and
# Reverse swaps the two coordinates.
# ----------------------------------------------------------------------------------------------------

def _hand_maf(blocks):
    model = MAF(2, depth=len(blocks), hidden=8)
    with torch.no_grad():
        for block, (gamma, beta) in zip(model.blocks, blocks):
            bn = block.layers[1]
            bn.eps = 0.0
            bn.log_gamma.copy_(torch.log(torch.tensor(gamma)))
            bn.beta.copy_(torch.tensor(beta))
    return model.eval()


def _hand_pair():
    # teacher block 0: (2 x1 + 1, x2 - 1) reversed -> a = (x2 - 1, 2 x1 + 1); reported in data order
    #                  (one reversal undone): t0 = (2 x1 + 1, x2 - 1)
    # teacher block 1: on a: (a1, 3 a2 + 0.5) reversed -> t1 = (3 a2 + 0.5, a1) (two reversals: data order)
    # student block 0: (x1 + 0.5, x2) reversed, then reported in data order -> s0 = (x1 + 0.5, x2)
    teacher = freeze(_hand_maf([((2.0, 1.0), (1.0, -1.0)), ((1.0, 3.0), (0.0, 0.5))]))
    student = _hand_maf([((1.0, 1.0), (0.5, 0.0))])
    return teacher, student


X_HAND = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
# t0 = [[3, 1], [-1, -0.5]], t1 = [[9.5, 1], [-2.5, -0.5]], s0 = [[1.5, 2], [-0.5, 0.5]]


def test_distances_by_hand_and_unknown_distance():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 8.0]])
    assert latent_distance(a, b, "l1").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert latent_distance(a, b, "mse").item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    with pytest.raises(ValueError, match="unknown distance 'l2'.*l1, mse"):
        latent_distance(a, b, "l2")
    with pytest.raises(ValueError, match=r"shapes \(2, 2\) and \(4,\)"):
        latent_distance(a, b.reshape(-1))


def test_hand_computed_latents_lkd_ilkd_nll():
    teacher, student = _hand_pair()
    enc_t, enc_s = teacher.encode(X_HAND), student.encode(X_HAND)
    assert torch.equal(enc_t.latents[0], torch.tensor([[3.0, 1.0], [-1.0, -0.5]]))
    assert torch.equal(enc_t.latents[1], torch.tensor([[9.5, 1.0], [-2.5, -0.5]]))
    assert torch.equal(enc_s.latents[0], torch.tensor([[1.5, 2.0], [-0.5, 0.5]]))

    # |t1 - s0| = 8, 1, 2, 1: MSE (the default, as the official code) 70 / 4, L1 (the paper's text) 12 / 4
    assert lkd_loss(teacher, student, X_HAND).item() == pytest.approx((64 + 1 + 4 + 1) / 4)
    assert lkd_loss(teacher, student, X_HAND, distance="l1").item() == pytest.approx(12 / 4)
    # default pairing for K_t = 2, K_s = 1 is the final latent only
    assert default_pairs(teacher, student) == [(0, 1)]
    assert ilkd_loss(teacher, student, X_HAND).item() == pytest.approx(70 / 4)
    # custom pairs: |t0 - s0| = 1.5, 1, 0.5, 1 -> MSE 4.5 / 4, L1 1; and the final latent. ILKD is the mean
    # over the pairs (official code: kd_loss_value /= len(student_kd_indices)), not their sum.
    assert ilkd_loss(teacher, student, X_HAND, pairs=[(0, 0), (0, 1)]).item() == pytest.approx(
        (4.5 / 4 + 70 / 4) / 2)
    assert ilkd_loss(teacher, student, X_HAND, pairs=[(0, 0), (0, 1)], distance="l1").item() == pytest.approx(
        (1 + 12 / 4) / 2)

    # student NLL: log-det sum(log gamma) = 0; 0.5 |s0|^2 = 3.125 and 0.25; plus log(2 pi) per sample (D=2)
    expected_nll = (3.125 + 0.25) / 2 + LOG_2PI
    assert nll(student, X_HAND).item() == pytest.approx(expected_nll)
    # and bits/dim of continuous data is nll / (D ln 2)
    assert bits_per_dim(student, X_HAND).item() == pytest.approx(expected_nll / (2 * math.log(2)))

    out = distillation_loss(teacher, student, X_HAND, method="lkd")
    assert out.lambdas == (0.9, 0.1, 0.0)
    assert set(out.terms) == {"nll", "lkd"}
    assert out.terms["nll"].item() == pytest.approx(expected_nll)
    assert out.total.item() == pytest.approx(0.9 * expected_nll + 0.1 * 70 / 4)
    out = distillation_loss(teacher, student, X_HAND, method="ilkd", lambdas=(0.5, 2.0, 0.0),
                            pairs=[(0, 0), (0, 1)])
    assert out.total.item() == pytest.approx(0.5 * expected_nll + 2.0 * (4.5 / 4 + 70 / 4) / 2)
    out = distillation_loss(teacher, student, X_HAND, method="ilkd", lambdas=(0.5, 2.0, 0.0),
                            pairs=[(0, 0), (0, 1)], distance="l1")
    assert out.total.item() == pytest.approx(0.5 * expected_nll + 2.0 * (1 + 12 / 4) / 2)


def test_hand_computed_skd():
    # Inverses: teacher x1 = ((t1_1 - 0.5) / 3 - 1) / 2, x2 = t1_2 + 1; student x = (s0_1 - 0.5, s0_2).
    teacher, student = _hand_pair()
    noise = [torch.tensor([[1.0, -2.0], [0.0, 0.0]])]
    # paper mode, temperature 0.5: w = (0.5, -1) -> teacher (-0.5, 0), student (0, -1)
    #                              w = (0, 0)    -> teacher (-7/12, 1), student (-0.5, 0)
    expected = (1.0 + 0.5 + 1 / 12 + 1.0) / 4
    assert skd_loss(teacher, student, noise=noise, temperature=0.5, skd_mode="paper").item() == pytest.approx(
        expected)
    out = distillation_loss(teacher, student, X_HAND, method="skd", lambdas=(0.0, 0.0, 1.0),
                            noise=noise, temperature=0.5, skd_mode="paper")
    assert set(out.terms) == {"nll", "skd"}
    assert out.total.item() == pytest.approx(expected)
    # official mode (the default): a tabular model has only the top latent, decoded at T = 1 whatever the
    # temperature: w = (1, -2) -> teacher (-5/12, -1), student (0.5, -2); w = (0, 0) as above. L1 (default).
    expected_t1 = (11 / 12 + 1.0 + 1 / 12 + 1.0) / 4
    for temperature in (0.5, 0.7, 1.0):
        assert skd_loss(teacher, student, noise=noise, temperature=temperature).item() == pytest.approx(
            expected_t1)
    out = distillation_loss(teacher, student, X_HAND, method="skd", lambdas=(0.0, 0.0, 1.0), noise=noise)
    assert out.total.item() == pytest.approx(expected_t1)
    # MSE on request: squares of the same differences
    assert skd_loss(teacher, student, noise=noise, distance="mse").item() == pytest.approx(
        ((11 / 12) ** 2 + 1 + (1 / 12) ** 2 + 1) / 4)
    out = distillation_loss(teacher, student, X_HAND, method="skd", lambdas=(0.0, 0.0, 1.0), noise=noise,
                            skd_distance="mse")
    assert out.total.item() == pytest.approx(((11 / 12) ** 2 + 1 + (1 / 12) ** 2 + 1) / 4)


MODELS = {
    "maf": (lambda depth: MAF(4, depth=depth, hidden=16), _tab),
    "glow-tabular": (lambda depth: Glow((4,), depth=depth, hidden=16), _tab),
    "glow-image": (lambda depth: Glow((1, 8, 8), levels=2, depth=depth, hidden=8), _img),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_copy_of_teacher_has_zero_distillation_losses(kind):
    build, data = MODELS[kind]
    x = data()
    teacher = freeze(_trained_like(build(3), x))
    student = copy.deepcopy(teacher).requires_grad_(True)
    # MAF's batch norm uses batch statistics in training mode, so only an eval-mode copy computes the
    # teacher's function; GLOW's (initialised) ActNorm is the same map in both modes.
    student.train(kind != "maf")
    g = torch.Generator().manual_seed(3)
    assert lkd_loss(teacher, student, x).item() == 0.0
    assert ilkd_loss(teacher, student, x).item() == 0.0
    assert skd_loss(teacher, student, 5, generator=g, skd_mode="paper").item() == 0.0
    out = distillation_loss(teacher, student, x, method="skd", skd_mode="paper")
    assert out.total.item() == pytest.approx(0.85 * nll(student, x).item(), rel=1e-6)
    # official SKD: a tabular model decodes the shared top latent only (zero for a copy); an image GLOW's
    # copy draws its own split-level noise, so even a copy of the teacher has a positive SKD term
    official = skd_loss(teacher, student, 5, generator=g).item()
    assert official > 1e-4 if kind == "glow-image" else official == 0.0
    # ...and a different student has positive losses
    perturb(student, scale=0.05, seed=9)
    assert lkd_loss(teacher, student, x).item() > 1e-4
    assert ilkd_loss(teacher, student, x).item() > 1e-4
    assert skd_loss(teacher, student, 5, generator=g).item() > 1e-4


def _manual_ilkd(teacher, student, x, pairs):
    with torch.no_grad():
        t, s = teacher.encode(x), student.encode(x)
    return sum((t.latents[i] - s.latents[j]).pow(2).mean() for j, i in pairs) / len(pairs)


def test_default_pairs_maf_and_tabular_glow():
    assert default_pairs(MAF(3, depth=6), MAF(3, depth=3)) == [(0, 1), (1, 3), (2, 5)]
    assert default_pairs(MAF(3, depth=9), MAF(3, depth=3)) == [(0, 2), (1, 5), (2, 8)]
    assert default_pairs(MAF(3, depth=5), MAF(3, depth=5)) == [(j, j) for j in range(5)]
    assert default_pairs(Glow((4,), depth=3, hidden=64), Glow((4,), depth=3, hidden=32)) == [
        (0, 0), (1, 1), (2, 2)]
    assert default_pairs(Glow((4,), depth=4), Glow((4,), depth=2)) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="more distillation points"):
        default_pairs(MAF(3, depth=2), MAF(3, depth=3))


def test_default_pairs_image_glow_every_level():
    teacher = Glow((1, 8, 8), levels=3, depth=4, hidden=8)
    student = Glow((1, 8, 8), levels=3, depth=1, hidden=8)
    assert default_pairs(teacher, student) == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError, match="teacher has 3 levels and student 2"):
        default_pairs(teacher, Glow((1, 8, 8), levels=2, depth=1, hidden=8))
    with pytest.raises(ValueError, match="both models to be image GLOWs"):
        default_pairs(teacher, MAF(64, depth=1))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_ilkd_and_lkd_match_manual_computation(kind):
    build, data = MODELS[kind]
    x = data(seed=1)
    teacher = freeze(_trained_like(build(6), x, seed=1))
    student = _trained_like(build(3), x, seed=2)
    pairs = default_pairs(teacher, student)
    if kind == "glow-image":
        assert pairs == [(0, 0), (1, 1)]
    else:
        assert pairs == [(0, 1), (1, 3), (2, 5)]
    student.eval()  # deterministic: the manual and library passes see the same batch-norm statistics
    expected = _manual_ilkd(teacher, student, x, pairs)
    assert ilkd_loss(teacher, student, x).item() == pytest.approx(expected.item(), rel=1e-6)
    with torch.no_grad():
        t, s = teacher.encode(x).flat(), student.encode(x).flat()
    assert lkd_loss(teacher, student, x).item() == pytest.approx((t - s).pow(2).mean().item(), rel=1e-6)
    assert lkd_loss(teacher, student, x, distance="l1").item() == pytest.approx(
        (t - s).abs().mean().item(), rel=1e-6)


def test_ilkd_custom_pairs_errors_name_the_pair():
    x = _img()
    teacher = freeze(Glow((1, 8, 8), levels=2, depth=2, hidden=8))
    student = Glow((1, 8, 8), levels=2, depth=1, hidden=8)
    message = r"pair #1 \(student point 0, teacher point 1\).*student \(4, 4, 4, 4\), teacher \(4, 8, 2, 2\)"
    with pytest.raises(ValueError, match=message):
        ilkd_loss(teacher, student, x, pairs=[(0, 0), (0, 1)])
    with pytest.raises(IndexError, match=r"pair #0 \(student 2, teacher 0\) is out of range"):
        ilkd_loss(teacher, student, x, pairs=[(2, 0)])


@pytest.mark.parametrize("method", ["lkd", "ilkd", "skd"])
def test_gradients_reach_student_only_and_teacher_unchanged(method):
    x = _tab(seed=4)
    teacher = _trained_like(MAF(4, depth=6, hidden=16), x, seed=4).eval()  # requires_grad stays True
    student = _trained_like(MAF(4, depth=3, hidden=16), x, seed=5)
    before = copy.deepcopy(teacher.state_dict())
    out = distillation_loss(teacher, student, x, method=method, generator=torch.Generator().manual_seed(0))
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # the distillation term alone (no NLL) also sends gradients to the student
    student.zero_grad()
    term = {"lkd": lkd_loss, "ilkd": ilkd_loss}.get(method)
    loss = term(teacher, student, x) if term else skd_loss(teacher, student, 8)
    loss.backward()
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_in_training_mode_is_refused():
    x = _tab()
    teacher, student = MAF(4, depth=2), MAF(4, depth=1)
    with pytest.raises(RuntimeError, match="freeze"):
        lkd_loss(teacher, student, x)
    frozen = freeze(teacher)
    assert frozen is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def _decode_spy(teacher, student):
    seen = {}

    def spy(name, fn):
        def wrapped(z):
            seen.setdefault(name, []).append([t.detach().clone() for t in z])
            return fn(z)
        return wrapped

    teacher.decode = spy("teacher", teacher.decode)
    student.decode = spy("student", student.decode)
    return seen


def test_skd_official_image_glow_shares_only_the_top_latent():
    teacher = freeze(Glow((1, 8, 8), levels=2, depth=2, hidden=8))
    student = Glow((1, 8, 8), levels=2, depth=1, hidden=8)
    seen = _decode_spy(teacher, student)
    skd_loss(teacher, student, 3, temperature=0.7, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    shared = teacher.sample_noise(3, g)
    own = student.sample_noise(3, g)  # the student's split-level noise: the next, independent draw
    assert len(seen["teacher"]) == len(seen["student"]) == 1
    zt, zs = seen["teacher"][0], seen["student"][0]
    assert torch.equal(zt[-1], zs[-1]) and torch.equal(zt[-1], shared[-1])  # top: shared, at T = 1
    assert torch.allclose(zt[0], 0.7 * shared[0]) and torch.allclose(zs[0], 0.7 * own[0])  # split: 0.7
    assert not torch.allclose(zt[0], zs[0])  # ...and drawn independently for each model


def test_skd_tabular_official_is_the_distance_of_decodes_at_temperature_one():
    x = _tab(seed=6)
    for build in (lambda d: MAF(4, depth=d, hidden=8), lambda d: Glow((4,), depth=d, hidden=8)):
        teacher = freeze(_trained_like(build(2), x, seed=6))
        student = _trained_like(build(1), x, seed=7).eval()
        noise = teacher.sample_noise(6, torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = (teacher.decode(noise) - student.decode(noise)).abs().mean().item()
            paper = (teacher.sample(noise=noise, temperature=0.7)
                     - student.sample(noise=noise, temperature=0.7)).abs().mean().item()
        assert skd_loss(teacher, student, noise=noise).item() == pytest.approx(expected, rel=1e-6)
        paper_skd = skd_loss(teacher, student, noise=noise, skd_mode="paper").item()
        assert paper_skd == pytest.approx(paper, rel=1e-6)
        assert abs(paper - expected) > 1e-4
    with pytest.raises(ValueError, match="unknown skd_mode 'both'; choose one of official, paper"):
        skd_loss(teacher, student, 2, skd_mode="both")
    with pytest.raises(ValueError, match="unknown skd_mode 'both'"):
        distillation_loss(teacher, student, x, method="skd", skd_mode="both")


def test_image_nll_term_in_bits_per_dim_equals_bits_per_dim():
    x_int = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    pre = ImagePreprocess("glow")
    y, pre_logdet = pre(dequantize(x_int, generator=torch.Generator().manual_seed(4)))
    student = _trained_like(Glow((1, 8, 8), levels=2, depth=1, hidden=8), y, seed=3).eval()
    for bins in (256, 32):
        out = distillation_loss(None, student, y, method="student", nll_unit="bits/dim",
                                pre_logdet=pre_logdet, bins=bins)
        assert out.terms["nll"].item() == pytest.approx(bits_per_dim(student, y, pre, bins).item(), rel=1e-6)
        assert out.total.item() == pytest.approx(out.terms["nll"].item())
    # logit preprocessing: a non-zero pre_logdet enters with the same sign as in bits_per_dim
    pre = ImagePreprocess("logit")
    y, pre_logdet = pre(dequantize(x_int, generator=torch.Generator().manual_seed(4)))
    out = distillation_loss(None, student, y, method="student", nll_unit="bits/dim", pre_logdet=pre_logdet)
    assert out.terms["nll"].item() == pytest.approx(bits_per_dim(student, y, pre).item(), rel=1e-6)
    # no preprocessing term: bits_per_dim with preprocess=None; nats is the default unit
    out = distillation_loss(None, student, y, method="student", nll_unit="bits/dim")
    assert out.terms["nll"].item() == pytest.approx(bits_per_dim(student, y).item(), rel=1e-6)
    nats = distillation_loss(None, student, y, method="student").terms["nll"].item()
    assert nats == pytest.approx(nll(student, y).item(), rel=1e-6)
    assert nats == pytest.approx(out.terms["nll"].item() * 64 * math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="unknown nll_unit 'bpd'; choose one of nats, bits/dim"):
        distillation_loss(None, student, y, nll_unit="bpd")
    with pytest.raises(ValueError, match=r"pre_logdet should have shape \(4,\)"):
        distillation_loss(None, student, y, method="student", nll_unit="bits/dim", pre_logdet=pre_logdet[:2])


def test_defaults_follow_the_official_code():
    x = _tab(seed=8)
    teacher = freeze(_trained_like(MAF(4, depth=4, hidden=8), x, seed=8))
    student = _trained_like(MAF(4, depth=2, hidden=8), x, seed=9).eval()
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 1.0]])
    assert latent_distance(a, b).item() == pytest.approx((1 + 9) / 2)  # MSE
    pairs = default_pairs(teacher, student)
    with torch.no_grad():
        t, s = teacher.encode(x), student.encode(x)
    per_pair = [latent_distance(s.latents[j], t.latents[i]).item() for j, i in pairs]
    by_hand = [float(((s.latents[j] - t.latents[i]) ** 2).mean()) for j, i in pairs]
    assert per_pair == pytest.approx(by_hand, rel=1e-6)
    assert ilkd_loss(teacher, student, x).item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-6)
    out = distillation_loss(teacher, student, x, method="ilkd")
    assert out.terms["ilkd"].item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-6)
    lkd = distillation_loss(teacher, student, x, method="lkd").terms["lkd"].item()
    assert lkd == pytest.approx(float(((s.flat() - t.flat()) ** 2).mean()), rel=1e-6)
    points = {row["point"] for row in PAPER_VS_CODE}
    assert {"distance L_r", "ILKD over matched points", "image NLL unit in Eq. 15", "SKD noise count",
            "SKD shared levels (image GLOW)", "SKD temperature", "LKD weights (l0, l1, l2)"} <= points
    assert all(set(row) == {"point", "paper", "official", "flowlib", "option"} for row in PAPER_VS_CODE)


def test_skd_paper_mode_decodes_the_same_noise_at_every_level():
    teacher = freeze(Glow((1, 8, 8), levels=2, depth=2, hidden=8))
    student = Glow((1, 8, 8), levels=2, depth=1, hidden=8)
    seen = _decode_spy(teacher, student)
    skd_loss(teacher, student, 3, temperature=0.7, generator=torch.Generator().manual_seed(11),
             skd_mode="paper")
    expected = teacher.sample_noise(3, torch.Generator().manual_seed(11))
    assert len(seen["teacher"]) == len(seen["student"]) == 1
    zt, zs = seen["teacher"][0], seen["student"][0]
    assert len(zt) == len(zs) == 2  # both levels
    for a, b, e in zip(zt, zs, expected):
        assert torch.equal(a, b)
        assert torch.allclose(a, 0.7 * e)


def test_skd_refuses_different_latent_shapes():
    with pytest.raises(ValueError, match="latent shapes differ"):
        skd_loss(freeze(MAF(3, depth=1)), MAF(4, depth=1), 2)


def test_bits_per_dim_dequantisation_constant():
    class Uniform(torch.nn.Module):  # log p = 0: uniform density on the unit cube around 0
        def log_prob(self, y):
            return torch.zeros(y.shape[0])

    x_int = torch.randint(0, 256, (5, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    pre = ImagePreprocess("glow")
    y, _ = pre(dequantize(x_int, generator=torch.Generator().manual_seed(1)))
    # uniform on [0, 256)^D is exactly 8 bits per dimension
    assert bits_per_dim(Uniform(), y, pre).item() == pytest.approx(8.0)
    assert bits_per_dim(Uniform(), y, pre, bins=16).item() == pytest.approx(4.0)


def test_bits_per_dim_logit_preprocessing_counts_the_jacobian():
    class StdNormal(torch.nn.Module):
        def log_prob(self, y):
            return (-0.5 * y.pow(2) - 0.5 * LOG_2PI).flatten(1).sum(1)

    alpha = 0.05
    x01 = torch.rand(3, 2, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pre = ImagePreprocess("logit", alpha=alpha)
    y, _ = pre(x01)
    # log|dy/dx01| from autograd of y = logit(alpha + (1 - 2 alpha) x), independent of the layer's formula
    xg = x01.clone().requires_grad_(True)
    (dy,) = torch.autograd.grad(torch.logit(alpha + (1 - 2 * alpha) * xg).sum(), xg)
    d = 8
    log_p = StdNormal().log_prob(y) + dy.log().flatten(1).sum(1) - d * math.log(256)
    expected = (-log_p / (d * math.log(2))).mean()
    assert bits_per_dim(StdNormal(), y, pre).item() == pytest.approx(expected.item(), rel=1e-10)


def test_presets_and_method_errors():
    assert PRESETS["student"].lambdas == (1.0, 0.0, 0.0)
    assert PRESETS["ilkd"].lambdas == (0.9, 0.1, 0.0) and PRESETS["ilkd"].latent == "ilkd"
    assert PRESETS["skd"].lambdas == (0.85, 0.075, 0.075) and PRESETS["skd"].latent == "ilkd"
    assert PRESETS["lkd"].latent == "lkd" and PRESETS["lkd"].lambdas[1] > 0
    x = _tab()
    student = MAF(4, depth=1)
    out = distillation_loss(None, student, x, method="nll")
    assert set(out.terms) == {"nll"}
    assert out.total.item() == pytest.approx(nll(student, x).item())
    with pytest.raises(ValueError, match="unknown distillation method 'kd'"):
        distillation_loss(None, student, x, method="kd")
    with pytest.raises(ValueError, match="no latent term"):
        distillation_loss(freeze(MAF(4, depth=2)), student, x, method="student", lambdas=(1, 1, 0))
    with pytest.raises(ValueError, match="needs a teacher"):
        distillation_loss(None, student, x, method="ilkd")


def test_skd_sample_count_and_temperature_are_checked_before_any_model_runs():
    teacher, student = freeze(_trained_like(MAF(4, depth=2, hidden=8), _tab())), MAF(4, depth=1, hidden=8)
    for n in (0, -2, 1.5):
        with pytest.raises(ValueError, match="the number of SKD samples n must be an integer >= 1"):
            skd_loss(teacher, student, n)
    for t in (float("nan"), -0.7, float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            skd_loss(teacher, student, 4, temperature=t)
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            distillation_loss(teacher, student.train(), _tab(), method="skd", temperature=t)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1"):
        distillation_loss(teacher, student.train(), _tab(), method="skd", n_samples=0)
    with pytest.raises(ValueError, match="lambdas must be finite"):
        distillation_loss(teacher, student, _tab(), lambdas=(1.0, 0.1, float("inf")))
    assert torch.isfinite(skd_loss(teacher, student, 4, temperature=0.0))  # 0: both decode the zero latent


def test_a_refused_distillation_step_leaves_the_student_as_it_was():
    # the student (training mode: batch norm statistics) must not be changed by a call that is then refused
    teacher = freeze(_trained_like(MAF(4, depth=2, hidden=8), _tab()))
    student = MAF(4, depth=1, hidden=8).train()
    state = copy.deepcopy(student.state_dict())
    bad_batch = _tab()
    bad_batch[3, 1] = float("nan")
    calls = [
        (lambda: distillation_loss(teacher, student, bad_batch, method="ilkd"), ValueError, "NaN or inf"),
        (lambda: distillation_loss(teacher, student, _tab(), method="ilkd", pairs=[(0, 7)]), IndexError,
         "out of range"),
        (lambda: ilkd_loss(teacher, student, _tab(), pairs=[(3, 0)]), IndexError, "out of range"),
        (lambda: distillation_loss(teacher, student, _tab(d=5), method="lkd"), ValueError,
         r"expects input of shape \(N, 4\)"),
        (lambda: distillation_loss(teacher, student, _tab()[:0], method="skd"), ValueError,
         "batch of 0 samples"),
    ]
    for call, error, match in calls:
        with pytest.raises(error, match=match):
            call()
        for k, v in student.state_dict().items():
            assert torch.equal(v, state[k]), k
