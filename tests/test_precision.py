"""bf16 mixed precision for the coupling networks (flowlib.precision, issue 19): a bf16 training pass's
log-likelihood stays within 0.005 nats per dimension of float32's on small GLOWs, evaluation is float32
whatever the setting, and a short bf16 training run ends where the float32 one does."""

from __future__ import annotations

import pytest
import torch

from flowlib.models import Glow
from flowlib.precision import conditioner_precision
from flowlib.train import TrainConfig, config_hash, train

#: the stated tolerance: |log p_bf16(x) - log p_fp32(x)| per sample, in nats per dimension
TOLERANCE = 5e-3

MODELS = {
    "tabular": (lambda: Glow((6,), depth=3, hidden=32, conditioner="official"), (6,)),
    "image": (lambda: Glow((1, 8, 8), levels=2, depth=2, hidden=16), (1, 8, 8)),
}


def _model(name: str) -> tuple[Glow, torch.Tensor]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    x = torch.randn(64, *shape)
    with torch.no_grad():
        model.log_prob(x)  # ActNorm's data-dependent initialisation
        for p in model.parameters():  # away from the identity start, so every conditioner matters
            p.add_(0.05 * torch.randn_like(p))
    return model, x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_bf16_training_pass_stays_within_the_tolerance_of_float32(name):
    model, x = _model(name)
    fp32 = model.log_prob(x)
    with conditioner_precision("bf16"):
        bf16 = model.log_prob(x)
    assert bf16.dtype == torch.float32  # log-dets, prior and loss stay in float32
    per_dim = (bf16 - fp32).abs().max() / x[0].numel()
    assert 0 < per_dim < TOLERANCE  # bf16 was used (not 0), and its error is small
    bf16.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_evaluation_is_float32_whatever_the_setting(name):
    model, x = _model(name)
    with torch.no_grad():
        fp32 = model.log_prob(x)
        with conditioner_precision("bf16"):
            assert torch.equal(model.log_prob(x), fp32)


def test_precision_is_checked_and_fp32_keeps_older_checkpoint_names():
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        with conditioner_precision("half"):
            pass
    base = TrainConfig(name="m", arch="glow")
    stored = base.to_dict()
    del stored["precision"]  # a checkpoint written before the field existed
    assert config_hash(stored) == config_hash(base)
    assert config_hash(base.replace(precision="bf16")) != config_hash(base)


def test_a_short_bf16_run_ends_where_float32_ends():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 6, generator=g) @ torch.randn(6, 6, generator=g)
    config = TrainConfig(name="p", arch="glow", steps=150, batch_size=128, eval_every=150, lr=3e-3,
                         model_kwargs={"depth": 3, "hidden": 32, "conditioner": "official"})
    ends = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = Glow((6,), depth=3, hidden=32, conditioner="official")
        history = train(model, x[:768], x[768:], config.replace(precision=precision), progress=False)
        ends[precision] = history[-1]["val_nll"]
    torch.manual_seed(0)
    start = -Glow((6,), depth=3, hidden=32, conditioner="official").log_prob(x[768:]).mean().item()
    assert ends["fp32"] < start - 1  # it learned
    assert ends["bf16"] != ends["fp32"]  # the bf16 run did use bf16
    assert abs(ends["bf16"] - ends["fp32"]) < 0.05 * abs(start - ends["fp32"])
