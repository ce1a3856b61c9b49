"""The 784-D Self Normalizing Flows study (flowlib.selfnorm_study) and fit()'s distillation, patience and
best-weights options."""

import math

import pytest
import torch

from flowlib import selfnorm_study as study
from flowlib.distill import latent_distance
from flowlib.selfnorm import SelfNormFC, exact_test_nll, fit


def test_block_pairs_follow_the_official_depth_matching():
    assert study.block_pairs(3, 9) == [(0, 2), (1, 5), (2, 8)]  # student block j meets teacher block 3j
    assert study.block_pairs(2, 4) == [(0, 1), (1, 3)]
    assert study.block_pairs(2, 2) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="student_blocks <= teacher_blocks"):
        study.block_pairs(3, 2)


def test_paired_interval_by_hand():
    res = study.paired_interval([10.0, 20.0, 30.0], [11.0, 22.0, 33.0])  # differences 1, 2, 3
    assert res["mean"] == pytest.approx(2.0) and res["se"] == pytest.approx(1 / math.sqrt(3))
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n), sd = 1
    assert res["low"] == pytest.approx(2.0 - half) and res["high"] == pytest.approx(2.0 + half)
    one = study.paired_interval([1.0], [2.0])
    assert one["low"] is None and one["high"] is None and one["mean"] == 1.0
    assert study.format_interval(one) == "+1.0 (one seed: no interval)"
    assert study.format_interval(res, 2) == f"+2.00 [{2 - half:+.2f}, {2 + half:+.2f}]"
    with pytest.raises(ValueError, match="paired"):
        study.paired_interval([1.0, 2.0], [1.0])


def test_data_nll_counts_the_logit_jacobian_and_the_pixel_scale():
    torch.manual_seed(0)
    model = SelfNormFC(study.DIM, layers=1, exact=True).double().eval()
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    got = study.data_nll(model.float(), images, flat=True, seed=7)
    # by hand: the same dequantisation draw, the logit map and its Jacobian, D log 256
    g = torch.Generator().manual_seed(7)
    x01 = (images.double() + torch.rand(images.shape, generator=g).double()) / 256  # float32 draws
    s = study.ALPHA + (1 - 2 * study.ALPHA) * x01
    y = (torch.log(s) - torch.log1p(-s)).reshape(3, -1)
    log_jac = (math.log(1 - 2 * study.ALPHA) - torch.log(s) - torch.log1p(-s)).reshape(3, -1).sum(1)
    with torch.no_grad():
        log_p = model.double().log_prob(y)
    expected = -(log_p + log_jac) + study.DIM * math.log(256)
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=0)
    assert study.bits_per_dim(float(got.mean())) == pytest.approx(float(got.mean()) / (784 * math.log(2)))


def test_build_uses_the_official_reconstruction_weights():
    fc, glow = study.build("fc", exact=False), study.build("glow", exact=False, glow_depth=1, glow_hidden=8)
    assert fc.blocks[0][1].recon_weight == 1.0
    assert glow.level_steps[0][0].mix.recon_weight == 100.0
    assert study.build("fc", exact=True).exact
    with pytest.raises(ValueError, match="unknown model kind"):
        study.build("maf", exact=False)


def _student_and_teacher():
    torch.manual_seed(1)
    teacher = SelfNormFC(6, layers=4, exact=True)
    with torch.no_grad():
        teacher.log_prob(torch.randn(64, 6))  # ActNorm initialisation
    torch.manual_seed(2)
    return SelfNormFC(6, layers=2), teacher


@pytest.mark.parametrize("distill", ["lkd", "ilkd"])
def test_fit_adds_the_latent_distance_of_the_drawn_batch(distill):
    student, teacher = _student_and_teacher()
    x_train = torch.randn(200, 6, generator=torch.Generator().manual_seed(3))
    reference = SelfNormFC(6, layers=2)
    reference.load_state_dict(student.state_dict())
    pairs = study.block_pairs(2, 4)
    hist = fit(student, x_train, steps=1, batch_size=32, seed=5, eval_every=1, progress=False,
               teacher=teacher, distill=distill, pairs=pairs, distance="mse")
    # redraw fit's batches: the initialisation batch, then the first training batch
    g = torch.Generator().manual_seed(5)
    init = x_train[torch.randint(200, (32,), generator=g)]
    xb = x_train[torch.randint(200, (32,), generator=g)]
    reference.train()
    with torch.no_grad():
        reference.log_prob(init)
        s_enc, t_enc = reference.encode(xb), teacher.encode(xb)
    if distill == "lkd":
        expected = latent_distance(t_enc.flat(), s_enc.flat(), "mse")
    else:
        expected = sum(latent_distance(t_enc.latents[j], s_enc.latents[i], "mse") for i, j in pairs) / 2
    assert hist[1]["latent"] == pytest.approx(expected.item(), rel=1e-5)
    weight = 0.1 / 0.9 * 6 * math.log(2)
    assert hist[1]["loss"] > weight * hist[1]["latent"]  # the distance enters the loss with its weight
    assert not any(p.requires_grad for p in teacher.parameters())


def test_fit_with_patience_stops_and_keeps_the_best_weights():
    torch.manual_seed(4)
    model = SelfNormFC(6, layers=2)
    g = torch.Generator().manual_seed(6)
    x_train, x_val = torch.randn(64, 6, generator=g) * 3, torch.randn(32, 6, generator=g)
    hist = fit(model, x_train, x_val, steps=400, batch_size=64, lr=3e-2, eval_every=5, patience=3,
               progress=False)
    last = hist[-1]
    assert last["best_step"] < last["stopped"] <= 400
    assert last["stopped"] - last["best_step"] == 15  # three evaluations without improvement
    assert exact_test_nll(model, x_val, seed=1) == pytest.approx(last["best_val_nll"], rel=1e-6)
    assert min(h["val_nll"] for h in hist) == pytest.approx(last["best_val_nll"])
    with pytest.raises(ValueError, match="patience needs x_val"):
        fit(model, x_train, steps=5, patience=2, progress=False)
