import math

import pytest
import torch

from flowlib.models import (
    MAF,
    PAPER_PARAMS_K,
    PRESETS,
    TABULAR_DIMS,
    Glow,
    build_model,
    count_parameters,
    from_preset,
)
from tests.flowcheck import check_gradients, check_jacobian_logdet, check_state_dict, perturb

MODELS = {
    "glow-image": (lambda: Glow((1, 4, 4), levels=2, depth=2, hidden=8), (1, 4, 4)),
    "glow-image-rgb": (lambda: Glow((3, 4, 4), levels=1, depth=2, hidden=8), (3, 4, 4)),
    "glow-tabular": (lambda: Glow((5,), depth=3, hidden=8), (5,)),
    "glow-tabular-official": (lambda: Glow((5,), depth=3, hidden=8, conditioner="official"), (5,)),
    "maf": (lambda: MAF(5, depth=3, hidden=8), (5,)),
    "maf-no-bn": (lambda: MAF(4, depth=2, hidden=8, batch_norm=False), (4,)),
}


def _trained(make, shape, seed=0):
    torch.manual_seed(seed)
    model = make().double()
    model.train()
    model.encode(torch.randn(32, *shape, dtype=torch.float64) * 1.5 + 0.3)  # ActNorm / BatchNorm statistics
    perturb(model, 0.1, seed)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_invertible_and_logdet_exact(name):
    make, shape = MODELS[name]
    model = _trained(make, shape)
    x = torch.randn(3, *shape, dtype=torch.float64)
    enc = model.encode(x)
    assert enc.logdet.shape == (3,)
    x_rec = model.decode(enc.z)
    assert torch.allclose(x_rec, x, atol=1e-8, rtol=0)
    assert torch.allclose(model.decode(enc.flat()), x, atol=1e-8, rtol=0)
    check_jacobian_logdet(lambda v: model.encode(v).flat(), x, enc.logdet)
    # decode direction: log|det d x / d z| = -logdet of the encoder at x
    check_jacobian_logdet(lambda v: model.decode(v), enc.flat(), -enc.logdet)
    # log_prob is the change of variables (Eq. 1): log N(z) + log|det dz/dx|
    flat = enc.flat()
    expected = -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi) + enc.logdet
    assert torch.allclose(model.log_prob(x), expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_gradients_state_dict_and_float32(name):
    make, shape = MODELS[name]
    model = _trained(make, shape)
    x = torch.randn(8, *shape, dtype=torch.float64)
    model.train()
    check_gradients(model, lambda: -model.log_prob(x).mean())
    model.eval()
    check_state_dict(model, make, lambda m: m.log_prob(x))
    model32 = model.float()
    x32 = torch.randn(256, *shape) * 1.5
    assert (model32.decode(model32.encode(x32).z) - x32).abs().max() < 1e-4
    assert model32.log_prob(x32).dtype == torch.float32


def test_latents_are_the_distillation_points():
    glow = Glow((1, 8, 8), levels=3, depth=2, hidden=8)
    enc = glow.encode(torch.randn(2, 1, 8, 8))
    assert [tuple(t.shape[1:]) for t in enc.latents] == [(4, 4, 4), (8, 2, 2), (16, 1, 1)]
    assert [tuple(t.shape[1:]) for t in enc.z] == [(2, 4, 4), (4, 2, 2), (16, 1, 1)]
    assert torch.equal(enc.latents[-1], enc.z[-1])
    maf = MAF(4, depth=5, hidden=8)
    enc = maf.encode(torch.randn(2, 4))
    assert len(enc.latents) == 5 and torch.equal(enc.latents[-1], enc.z[0])
    tab = Glow((4,), depth=3, hidden=8)
    assert len(tab.encode(torch.randn(2, 4)).latents) == 3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_identity_initialised_model_gives_standard_normal_density(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().double().eval()  # no data seen: ActNorm identity, zero-initialised couplings/priors
    x = torch.randn(6, *shape, dtype=torch.float64)
    d = math.prod(shape)
    analytic = -0.5 * x.reshape(6, -1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    # BatchNormFlow's eps (1e-5) makes MAF differ from the identity by ~1e-5 per block
    assert torch.allclose(model.log_prob(x), analytic, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_temperature_scales_noise_and_same_noise_same_samples(name):
    make, shape = MODELS[name]
    model = _trained(make, shape)
    noise = model.sample_noise(4, generator=torch.Generator().manual_seed(3))
    a = model.sample(temperature=0.7, noise=noise)
    b = model.sample(temperature=0.7, noise=[n.clone() for n in noise])
    assert torch.equal(a, b)
    z = model.encode(a).flat()
    assert torch.allclose(z, 0.7 * model.flatten_latent(noise), atol=1e-8)
    g1 = model.sample(4, generator=torch.Generator().manual_seed(5))
    g2 = model.sample(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(g1, g2) and g1.shape == (4, *shape)


def test_model_moves_across_dtype_and_device_without_fixed_device_tensors():
    for make, shape in MODELS.values():
        torch.manual_seed(0)
        model = make().eval().to("meta")
        enc = model.encode(torch.empty(2, *shape, device="meta"))
        assert enc.logdet.device.type == "meta"
        assert model.decode(enc.z).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path; CPU path is covered above")
def test_model_runs_on_cuda():  # pragma: no cover - exercised on GPU machines only
    model = Glow((1, 8, 8), levels=2, depth=2, hidden=8).cuda()
    x = torch.rand(4, 1, 8, 8, device="cuda") - 0.5
    model.train()
    lp = model.log_prob(x)
    assert lp.device.type == "cuda" and torch.isfinite(lp).all()
    model.eval()
    assert (model.decode(model.encode(x).z) - x).abs().max() < 1e-4


def test_clear_errors():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels"):
        Glow((1, 28, 28), levels=3)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 1, 8, 8\)"):
        Glow((1, 8, 8), levels=2, depth=1, hidden=4).encode(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 5\)"):
        MAF(5, depth=1).encode(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="at least 2"):
        Glow((1,), depth=1, hidden=4)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("realnvp", (4,))
    with pytest.raises(ValueError, match="unknown preset"):
        from_preset("glow-huge")
    with pytest.raises(ValueError, match="latent 0 should have shape"):
        MAF(3, depth=1).decode([torch.zeros(2, 4)])


def test_paper_parameter_counts():
    # MAF (Table 2) and the image Glows (Table 5, L and K columns read swapped) match within 15%.
    for name in ("tabular-maf-student", "tabular-maf-teacher"):
        for ds, paper_k in PAPER_PARAMS_K[name].items():
            ours = count_parameters(from_preset(name, shape=(TABULAR_DIMS[ds],))) / 1000
            assert abs(ours - paper_k) / paper_k < 0.15, (name, ds, ours, paper_k)
    for name, ds in [("cifar10-glow-student", "cifar10"), ("cifar10-glow-teacher", "cifar10"),
                     ("celeba-glow-student", "celeba")]:
        with torch.device("meta"):
            ours = count_parameters(from_preset(name)) / 1000
        paper_k = PAPER_PARAMS_K[name][ds]
        assert abs(ours - paper_k) / paper_k < 0.15, (name, ours, paper_k)
    # Documented mismatch (see the comment above PRESETS): the CelebA teacher as configured in Table 5
    # has 44.1M parameters, not 61.2M.
    with torch.device("meta"):
        celeba_teacher = count_parameters(from_preset("celeba-glow-teacher")) / 1e3
    assert abs(celeba_teacher - 44_051) < 50
    assert set(PRESETS) == set(PAPER_PARAMS_K)


def _official_glow_step_params(d: int, h: int, lu_stored: bool) -> int:
    """One step of the official tabular Glow (vklyukin/nf_distillation, models/flows.py FlowStep, is_1d):
    ActNorm1d (2D), LU InvertibleConv1x1 (2D^2 + D stored, D^2 free), get_block_1d (6 Linear layers)."""
    a, b = d // 2, d - d // 2
    block = (a + 1) * h + 4 * (h * h + h) + (h + 1) * 2 * b
    return 2 * d + (2 * d * d + d if lu_stored else d * d) + block


@pytest.mark.parametrize("name", ["tabular-glow-student", "tabular-glow-teacher",
                                  "tabular-maf-student", "tabular-maf-teacher"])
def test_tabular_presets_reproduce_table2_parameter_counts(name):
    # All 20 tabular counts of Table 2 within 3%. GLOW: the official conditioner (get_block_1d) with teacher
    # K = 5, h = 64 and student K = 3, h = 32, each LU layer counted as its D^2 free values (the stored count
    # adds D (D + 1) per step; see the comment above PRESETS). MAF: stored counts.
    glow = name.startswith("tabular-glow")
    off = {}
    for ds, paper_k in PAPER_PARAMS_K[name].items():
        model = from_preset(name, shape=(TABULAR_DIMS[ds],))
        ours = count_parameters(model, lu="free" if glow else "stored") / 1000
        off[ds] = (round(ours, 2), paper_k)
        assert abs(ours - paper_k) / paper_k < 0.03, (name, ds, ours, paper_k)
        if glow:
            assert abs(ours - paper_k) < 0.1, (name, ds, ours, paper_k)  # as the audit found
            k, h = (5, 64) if name.endswith("teacher") else (3, 32)
            d = TABULAR_DIMS[ds]
            assert model.depth == k and model.hidden == h and model.conditioner == "official"
            assert count_parameters(model) == k * _official_glow_step_params(d, h, lu_stored=True)
            assert count_parameters(model, lu="free") == k * _official_glow_step_params(d, h, lu_stored=False)
    assert len(off) == 5, off


def test_official_conditioner_is_for_tabular_glow_only():
    with pytest.raises(ValueError, match="tabular Glow only"):
        Glow((3, 8, 8), levels=1, depth=1, hidden=4, conditioner="official")
    with pytest.raises(ValueError, match="unknown conditioner"):
        Glow((4,), depth=1, hidden=4, conditioner="resnet")
    with pytest.raises(ValueError, match="lu must be"):
        count_parameters(Glow((4,), depth=1, hidden=4), lu="packed")
    image = Glow((3, 8, 8), levels=1, depth=1, hidden=4)  # the default is accepted for images
    assert "conditioner" not in repr(image).splitlines()[0]
    assert "conditioner='official'" in repr(Glow((4,), depth=1, hidden=4, conditioner="official"))
    # the default keeps the old 2-hidden-layer network, so old checkpoints still load
    old = Glow((4,), depth=2, hidden=4)
    assert len([m for m in old.steps[0].coupling.net if isinstance(m, torch.nn.Linear)]) == 3
    with pytest.raises(RuntimeError):
        Glow((4,), depth=2, hidden=4, conditioner="official").load_state_dict(old.state_dict())


def test_maf_latents_are_reported_in_data_order():
    # Identity-initialised blocks (eval mode) only reverse the features; every reported latent, whatever
    # the number of reversals behind it, must line up with the data's features so that a 3-block student
    # and a 6-block teacher are compared feature by feature (LKD / ILKD).
    x = torch.randn(5, 4)
    for depth in (1, 2, 3):
        enc = MAF(4, depth=depth).eval().encode(x)
        for latent in enc.latents + enc.z:
            assert torch.allclose(latent, x, atol=1e-4), depth


# --- issue item 10: weights derived for evaluation follow every way of changing the weights ---------------

WEIGHT_MODELS = {
    "maf": lambda: MAF(5, depth=3, hidden=8),
    "glow-tabular": lambda: Glow((6,), depth=2, hidden=8),
    "glow-image": lambda: Glow((2, 4, 4), levels=2, depth=2, hidden=4),
    "selfnorm-fc": lambda: __import__("flowlib.selfnorm", fromlist=["SelfNormFC"]).SelfNormFC(4, layers=2),
}
_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _weights_case(name: str, seed: int = 0):
    """A float32 model of ``WEIGHT_MODELS[name]`` with ActNorm initialised and batch-norm statistics away from
    0 / 1, every parameter random, in eval mode; and a batch for it."""
    torch.manual_seed(seed)
    model = WEIGHT_MODELS[name]()
    shape = model.input_shape
    model.train()
    with torch.no_grad():
        model.log_prob(torch.randn(64, *shape) * 1.5 + 0.3)
    perturb(model, 0.2, seed)
    return model.eval(), torch.randn(7, *shape, generator=torch.Generator().manual_seed(seed + 1))


def _nudge(model, seed=3, scale=0.05):
    """A small random change of every parameter, as a list of tensors."""
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(p.shape, generator=g) for p in model.parameters()]


def _change_data_add(model):
    for p, d in zip(model.parameters(), _nudge(model)):
        p.data.add_(d)  # the manual-averaging idiom: invisible to the parameter's version counter
    for name, b in model.named_buffers():
        if "running" in name:
            b.data.mul_(1.3)
    return model


def _change_load_state_dict(model):
    other, _ = _weights_case(next(k for k, f in WEIGHT_MODELS.items() if type(f()) is type(model)
                                  and f().input_shape == model.input_shape), seed=11)
    model.load_state_dict(other.state_dict())
    return model


def _change_copy(model):
    with torch.no_grad():
        for p, d in zip(model.parameters(), _nudge(model)):
            p.copy_(p + d)
    return model


def _change_optimizer_step(model):
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randn(16, *model.input_shape, generator=torch.Generator().manual_seed(5))
    (-model.log_prob(x).mean()).backward()
    opt.step()
    return model


def _change_vector_to_parameters(model):
    vec = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.nn.utils.vector_to_parameters(vec + torch.cat([d.flatten() for d in _nudge(model)]),
                                        model.parameters())
    return model


WEIGHT_CHANGES = {
    "data_add": _change_data_add,
    "load_state_dict": _change_load_state_dict,
    "copy_under_no_grad": _change_copy,
    "optimizer_step": _change_optimizer_step,
    "vector_to_parameters": _change_vector_to_parameters,
    "averaged_model": None,  # below: the EMA copy of torch.optim.swa_utils.AveragedModel
}


def _fresh_log_prob(model, x, mode):
    """log_prob of a newly built model given ``model``'s state_dict: no derived weight survives."""
    name = next(k for k, f in WEIGHT_MODELS.items()
                if type(f()) is type(model) and f().input_shape == model.input_shape)
    fresh = WEIGHT_MODELS[name]()
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with _MODES[mode]():
        return fresh.log_prob(x)


@pytest.mark.parametrize("mode", sorted(_MODES))
@pytest.mark.parametrize("change", list(WEIGHT_CHANGES))
@pytest.mark.parametrize("name", sorted(WEIGHT_MODELS))
def test_log_prob_without_gradients_sees_every_change_of_the_weights(name, change, mode):
    model, x = _weights_case(name)
    if change == "averaged_model":
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5))
        ema.update_parameters(model)  # the first update copies
        target = ema.module.eval()
    else:
        target = model
    with _MODES[mode]():
        before = target.log_prob(x)  # evaluated once before the change (a cache would be filled here)
    if change == "averaged_model":
        _change_copy(model)
        ema.update_parameters(model)  # EMA: halfway to the changed weights
    else:
        WEIGHT_CHANGES[change](target)
    target.eval()
    with _MODES[mode]():
        after = target.log_prob(x)
    expected = _fresh_log_prob(target, x, mode)
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after, before, rtol=1e-4, atol=1e-4)  # the change did matter


def _a_derived_weight(model, x):
    """A function returning one weight-derived tensor of ``model`` (W, a masked weight, a log-det)."""
    from flowlib.bijectors import InvertibleLinear, _MaskedLinear
    from flowlib.selfnorm import SelfNormLinear

    for m in model.modules():
        if isinstance(m, InvertibleLinear):
            return lambda: m._matrix(inverse=True)
        if isinstance(m, _MaskedLinear):
            return m.masked_weight
        if isinstance(m, SelfNormLinear):
            return lambda: m._cached_logdet("weight", x)
    raise AssertionError(type(model))


@pytest.mark.parametrize("mode", sorted(_MODES))
@pytest.mark.parametrize("name", sorted(WEIGHT_MODELS))
def test_cached_weights_computes_derived_weights_once_with_the_same_numbers(name, mode):
    from flowlib.bijectors import cached_weights

    model, x = _weights_case(name)
    derived = _a_derived_weight(model, x)
    with _MODES[mode]():
        plain = model.log_prob(x)
        decoded = model.decode(model.encode(x).z)
        assert derived() is not derived()  # by default: recomputed on every call
    with cached_weights(model) as same, _MODES[mode]():
        assert same is model
        cached, again = model.log_prob(x), model.log_prob(x)
        cached_decoded = model.decode(model.encode(x).z)
        assert derived() is derived()  # inside the block: computed once
        with cached_weights(model):  # blocks nest
            torch.testing.assert_close(model.log_prob(x), plain, rtol=0, atol=0)
        assert derived() is derived()  # the inner block's end does not end the outer one
    for value in (cached, again):
        torch.testing.assert_close(value, plain, rtol=0, atol=0)
    torch.testing.assert_close(cached_decoded, decoded, rtol=0, atol=0)
    with _MODES[mode]():
        assert derived() is not derived()  # after the block: recomputed again
    with torch.enable_grad(), cached_weights(model):
        assert derived() is not derived()  # with gradients nothing is cached (autograd must see it)


def test_cached_weights_still_follows_visible_changes_and_copies_do_not_inherit_it():
    import copy

    from flowlib.bijectors import cached_weights

    model, x = _weights_case("maf")
    with cached_weights(model), torch.no_grad():
        first = model.log_prob(x)
        twin = copy.deepcopy(model)  # a copy made inside the block is not cached
        model.load_state_dict(_weights_case("maf", seed=11)[0].state_dict())  # versions change: noticed
        loaded = model.log_prob(x)
        for p, d in zip(twin.parameters(), _nudge(twin)):
            p.data.add_(d)
        twin_after = twin.log_prob(x)
    torch.testing.assert_close(loaded, _fresh_log_prob(model, x, "no_grad"), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(loaded, first)
    torch.testing.assert_close(twin_after, _fresh_log_prob(twin, x, "no_grad"), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(twin_after, first)


# --- issue items 12 and 17: bad batches, empty batches, dtypes, temperatures ------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_sample_zero_and_an_empty_eval_batch_give_empty_results(name):
    make, shape = MODELS[name]
    model = _trained(make, shape)
    assert model.sample(0).shape == (0, *shape)
    assert model.sample(0, temperature=0.7, generator=torch.Generator().manual_seed(0)).shape == (0, *shape)
    empty = torch.zeros(0, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert model.log_prob(empty).shape == (0,)
    enc = model.encode(empty)
    assert [tuple(t.shape) for t in enc.z] == [(0, *s) for s in model.latent_shapes]
    assert model.decode(enc.z).shape == (0, *shape) and enc.flat().shape[0] == 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_temperature_must_be_finite_and_non_negative_and_zero_decodes_the_zero_latent(name):
    make, shape = MODELS[name]
    model = _trained(make, shape)
    for bad in (float("nan"), -0.5, float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            model.sample(3, temperature=bad)
    with pytest.raises(TypeError, match="temperature must be a number"):
        model.sample(3, temperature="hot")
    zeros = [torch.zeros(3, *s, dtype=torch.float64) for s in model.latent_shapes]
    torch.testing.assert_close(model.sample(3, temperature=0.0), model.decode(zeros), rtol=0, atol=0)
    torch.testing.assert_close(model.sample(3, temperature=torch.tensor(0.0)), model.decode(zeros),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_refused_training_batch_leaves_training_exactly_as_without_it(name):
    make, shape = MODELS[name]

    def fresh():
        torch.manual_seed(0)
        m = make().double().train()
        return m, torch.optim.Adam(m.parameters(), lr=1e-2)

    model, opt = fresh()
    reference, ref_opt = fresh()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, *shape, generator=g, dtype=torch.float64) for _ in range(3)]
    for i, xb in enumerate(batches):
        if i == 1:
            bad = xb.clone()
            bad.view(-1)[5] = float("nan")
            for refused in (bad, xb[:0]):
                with pytest.raises(ValueError, match="NaN or inf|batch of 0 samples"):
                    model.log_prob(refused)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            (-m.log_prob(xb).mean()).backward()
            o.step()
    for (k, v), (_, w) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(v, w), k


def test_input_of_another_dtype_names_both_dtypes_and_the_fix():
    model = MAF(3, depth=1)
    with pytest.raises(TypeError, match=r"input is float64 but the model's parameters are float32; "
                                        r"call model\.double\(\) or x\.float\(\)"):
        model.log_prob(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"input is bfloat16 .* call model\.bfloat16\(\) or x\.float\(\)"):
        model.encode(torch.zeros(2, 3, dtype=torch.bfloat16))
    model.double()
    with pytest.raises(TypeError, match=r"input is float32 but the model's parameters are float64; "
                                        r"call model\.float\(\) or x\.double\(\)"):
        model.log_prob(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"latent 0 is float32 but the model's parameters are float64"):
        model.sample(noise=torch.zeros(2, 3))


def test_sizes_of_zero_are_refused_naming_the_argument():
    for make, match in [(lambda: Glow((1, 0, 0)), r"shape=\(1, 0, 0\)"),
                        (lambda: Glow((4,), hidden=0), "hidden"),
                        (lambda: Glow((4,), depth=0), "depth"), (lambda: Glow((1, 4, 4), levels=0), "levels"),
                        (lambda: Glow((1, 4, 4), levels=1, hidden=0), "hidden"),
                        (lambda: MAF(4, hidden=0), "hidden"), (lambda: MAF(0), "dim"),
                        (lambda: MAF(4, depth=0), "depth"),
                        (lambda: build_model("maf", (4,), hidden=0), "hidden")]:
        with pytest.raises(ValueError, match=match):
            make()
