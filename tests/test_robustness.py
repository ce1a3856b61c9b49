"""Bad input to the public API is refused with a documented exception, and refused *before* anything changes.

The documented exception types:

* ``ValueError``: a bad value: a tensor of the wrong shape, an empty batch in training mode ("batch of 0
  samples"), a batch with NaN or inf values ("NaN or inf"), a size or count out of range (``hidden=0``,
  ``n=0`` SKD samples, ``Glow((1, 0, 0))``), a temperature that is not a finite number >= 0, a non-finite
  interpolation weight or loss weight.
* ``TypeError``: a value of the wrong type: not a tensor, not floating point, or a dtype other than the
  model's parameters ("input is float64 but the model's parameters are float32; call model.double() or
  x.float()").
* ``RuntimeError``: an object in the wrong state for the call (a teacher in training mode).
* ``IndexError``: an ILKD pair pointing past a model's distillation points.

Every row of :data:`CASES` is ``Case(id, build, call, error, match)``: ``build()`` returns what the call
works on (a module, or a tuple / dict of modules, or ``None``), ``call(obj)`` makes the bad call. The test
asserts the exception type, that its message matches ``match`` (``re.search``), and that every module's
``state_dict`` (parameters and buffers) is byte-identical before and after, and so is every submodule's
train / eval flag. To cover more of the API, append rows to ``CASES`` (one list, one test function).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from flowlib.bijectors import MADE, ActNorm, AffineCoupling, BatchNormFlow, InvertibleLinear
from flowlib.distill import distillation_loss, freeze, ilkd_loss, lkd_loss, skd_loss
from flowlib.interpolate import interpolate, interpolate_images, interpolation_samples, sample_at_temperatures
from flowlib.models import MAF, Glow
from flowlib.selfnorm import SelfNormFC, exact_test_nll


class Case(NamedTuple):
    id: str
    build: Callable[[], Any]
    call: Callable[[Any], Any]
    error: type[BaseException]
    match: str


# --- what the rows work on: small models, fresh (training mode, ActNorm not yet initialised) or ready ----

D = 4
IMAGE = (2, 4, 4)


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _nan(*shape, value=float("nan")):
    x = _x(*shape)
    x.view(-1)[1] = value
    return x


MODELS: dict[str, Callable[[], nn.Module]] = {
    "maf": lambda: MAF(D, depth=2, hidden=8),
    "glow": lambda: Glow((D,), depth=2, hidden=8),
    "glow-image": lambda: Glow(IMAGE, levels=2, depth=1, hidden=4),
    "selfnorm-fc": lambda: SelfNormFC(D, layers=2),
}


def _fresh(name: str) -> Callable[[], nn.Module]:
    """Training mode, straight from the constructor: the state a first bad batch could corrupt most."""
    def build():
        torch.manual_seed(0)
        return MODELS[name]().train()
    return build


def _ready(name: str) -> Callable[[], nn.Module]:
    """Eval mode after one training-mode pass (ActNorm initialised, batch-norm statistics set)."""
    def build():
        model = _fresh(name)()
        with torch.no_grad():
            model.log_prob(_x(32, *model.input_shape, seed=1) * 2 + 0.5)
        return model.eval()
    return build


def _pair():
    """(teacher, student) for the distillation losses: a frozen MAF teacher, a MAF student in training."""
    teacher = freeze(_ready("maf")())
    torch.manual_seed(1)
    return teacher, MAF(D, depth=1, hidden=8).train()


def _shape_of(name):
    return IMAGE if name == "glow-image" else (D,)


# --- the table ---------------------------------------------------------------------------------------------

CASES: list[Case] = []

for _name in MODELS:
    _s = _shape_of(_name)
    for _mode, _build in (("train", _fresh(_name)), ("eval", _ready(_name))):
        _p = f"{_name}-{_mode}"
        CASES += [
            Case(f"{_p}-nan-batch", _build, lambda m, s=_s: m.log_prob(_nan(3, *s)), ValueError,
                 "NaN or inf"),
            Case(f"{_p}-inf-batch", _build, lambda m, s=_s: m.encode(_nan(3, *s, value=float("inf"))),
                 ValueError, "NaN or inf"),
            Case(f"{_p}-float64-input", _build, lambda m, s=_s: m.log_prob(_x(3, *s, dtype=torch.float64)),
                 TypeError, r"input is float64 but the model's parameters are float32; "
                 r"call model\.double\(\) or x\.float\(\)"),
            Case(f"{_p}-float16-input", _build, lambda m, s=_s: m.encode(_x(3, *s).half()),
                 TypeError, r"input is float16 but the model's parameters are float32; "
                 r"call model\.half\(\)"),
            Case(f"{_p}-integer-input", _build,
                 lambda m, s=_s: m.log_prob(torch.zeros(3, *s, dtype=torch.long)), TypeError,
                 "floating point"),
            Case(f"{_p}-not-a-tensor", _build, lambda m, s=_s: m.log_prob(_x(3, *s).numpy()),
                 TypeError, r"expects a torch\.Tensor"),
            Case(f"{_p}-one-feature-too-many", _build, lambda m, s=_s: m.log_prob(_x(3, s[0] + 1, *s[1:])),
                 ValueError, r"expects input of shape \(N, .*\), got \(3, "),
            Case(f"{_p}-one-dimension-too-many", _build, lambda m, s=_s: m.log_prob(_x(3, *s, 2)),
                 ValueError, r"expects input of shape \(N, .*\), got \(3, "),
            Case(f"{_p}-sample-nan-temperature", _build, lambda m: m.sample(2, temperature=float("nan")),
                 ValueError, "temperature must be a finite number >= 0"),
            Case(f"{_p}-sample-negative-temperature", _build, lambda m: m.sample(2, temperature=-0.7),
                 ValueError, "temperature must be a finite number >= 0"),
            Case(f"{_p}-sample-inf-temperature", _build, lambda m: m.sample(2, temperature=float("inf")),
                 ValueError, "temperature must be a finite number >= 0"),
            Case(f"{_p}-sample-negative-n", _build, lambda m: m.sample(-1), ValueError,
                 "n must be an integer >= 0"),
            Case(f"{_p}-sample-fractional-n", _build, lambda m: m.sample(2.5), ValueError,
                 "n must be an integer >= 0"),
            Case(f"{_p}-decode-float64-latent", _build,
                 lambda m: m.decode([t.double() for t in m.sample_noise(2)]), TypeError,
                 r"latent 0 is float64 but the model's parameters are float32"),
            Case(f"{_p}-sample-noise-of-another-batch-size", _build,
                 lambda m: m.sample(noise=[t[: i + 1] for i, t in enumerate(m.sample_noise(3))])
                 if len(m.latent_shapes) > 1 else m.sample(noise=[t[:, :1] for t in m.sample_noise(2)]),
                 ValueError, "different batch sizes|should have shape"),
        ]
    CASES.append(Case(f"{_name}-train-empty-batch", _fresh(_name), lambda m, s=_s: m.log_prob(_x(0, *s)),
                      ValueError, "batch of 0 samples"))
    CASES.append(Case(f"{_name}-train-empty-batch-after-init", lambda n=_name: _ready(n)().train(),
                      lambda m, s=_s: m.log_prob(_x(0, *s)), ValueError, "batch of 0 samples"))

CASES += [
    # constructors: a size of 0 is refused, naming the argument
    Case("glow-zero-image-size", lambda: None, lambda _: Glow((1, 0, 0)), ValueError, r"shape=\(1, 0, 0\)"),
    Case("glow-zero-features", lambda: None, lambda _: Glow((0,)), ValueError, "shape"),
    Case("glow-hidden-0", lambda: None, lambda _: Glow((D,), hidden=0), ValueError, "hidden must be"),
    Case("glow-depth-0", lambda: None, lambda _: Glow((D,), depth=0), ValueError, "depth must be"),
    Case("glow-levels-0", lambda: None, lambda _: Glow(IMAGE, levels=0), ValueError, "levels must be"),
    Case("glow-image-hidden-0", lambda: None, lambda _: Glow(IMAGE, levels=1, hidden=0), ValueError,
         "hidden must be"),
    Case("maf-hidden-0", lambda: None, lambda _: MAF(D, hidden=0), ValueError, "hidden must be"),
    Case("maf-depth-0", lambda: None, lambda _: MAF(D, depth=0), ValueError, "depth must be"),
    Case("maf-dim-0", lambda: None, lambda _: MAF(0), ValueError, "dim must be"),
    Case("made-hidden-0", lambda: None, lambda _: MADE(D, hidden=0), ValueError, "hidden must be"),
    Case("made-layers-0", lambda: None, lambda _: MADE(D, layers=0), ValueError, "layers must be"),
    Case("coupling-hidden-0", lambda: None, lambda _: AffineCoupling(D, hidden=0), ValueError,
         "hidden must be"),
    Case("actnorm-0-features", lambda: None, lambda _: ActNorm(0), ValueError, "features must be"),
    Case("lu-0-features", lambda: None, lambda _: InvertibleLinear(0), ValueError, "features must be"),
    Case("batchnorm-0-features", lambda: None, lambda _: BatchNormFlow(0), ValueError, "features must be"),
    # bijectors called directly in training mode: the layers that set state from a batch guard it themselves
    Case("actnorm-empty-batch", lambda: ActNorm(D).train(), lambda m: m(_x(0, D)), ValueError,
         "batch of 0 samples"),
    Case("actnorm-nan-batch", lambda: ActNorm(D).train(), lambda m: m(_nan(5, D)), ValueError, "NaN or inf"),
    Case("actnorm-image-inf-batch", lambda: ActNorm(2).train(),
         lambda m: m(_nan(3, 2, 4, 4, value=-float("inf"))), ValueError, "NaN or inf"),
    Case("batchnorm-nan-batch", lambda: BatchNormFlow(D).train(), lambda m: m(_nan(5, D)), ValueError,
         "NaN or inf"),
    Case("batchnorm-reversed-inf-batch", lambda: BatchNormFlow(D).train(),
         lambda m: m(_nan(5, D, value=float("inf")), reversed_features=True), ValueError, "NaN or inf"),
    Case("batchnorm-overflowing-batch", lambda: BatchNormFlow(D).train(),
         lambda m: m(torch.tensor([[3e38] * D, [-3e38] * D])), ValueError, "overflow"),
    # distillation losses: the student (training mode) and the teacher stay as they were
    Case("skd-n-0", _pair, lambda p: skd_loss(*p, n=0), ValueError, "SKD samples n must be an integer >= 1"),
    Case("skd-n-negative", _pair, lambda p: skd_loss(*p, n=-4), ValueError, "must be an integer >= 1"),
    Case("skd-nan-temperature", _pair, lambda p: skd_loss(*p, n=4, temperature=float("nan")), ValueError,
         "temperature must be a finite number >= 0"),
    Case("skd-negative-temperature", _pair, lambda p: skd_loss(*p, n=4, temperature=-1.0), ValueError,
         "temperature must be a finite number >= 0"),
    Case("distillation-n-samples-0", _pair,
         lambda p: distillation_loss(*p, _x(8, D), method="skd", n_samples=0), ValueError,
         "n_samples must be an integer >= 1"),
    Case("distillation-nan-temperature", _pair,
         lambda p: distillation_loss(*p, _x(8, D), method="skd", temperature=float("nan")), ValueError,
         "temperature must be a finite number >= 0"),
    Case("distillation-nan-lambda", _pair,
         lambda p: distillation_loss(*p, _x(8, D), lambdas=(1.0, float("nan"), 0.0)), ValueError,
         "lambdas must be finite"),
    Case("distillation-nan-batch", _pair, lambda p: distillation_loss(*p, _nan(8, D), method="ilkd"),
         ValueError, "NaN or inf"),
    Case("distillation-empty-batch", _pair, lambda p: distillation_loss(*p, _x(0, D), method="ilkd"),
         ValueError, "batch of 0 samples"),
    Case("distillation-float64-batch", _pair,
         lambda p: distillation_loss(*p, _x(8, D, dtype=torch.float64), method="skd"), TypeError,
         "input is float64"),
    Case("distillation-skd-latent-mismatch", lambda: (freeze(_ready("maf")()), MAF(D + 1, depth=1).train()),
         lambda p: distillation_loss(*p, _x(8, D + 1), method="skd", lambdas=(1.0, 0.0, 1.0)), ValueError,
         "latent shapes differ"),
    Case("lkd-nan-batch", _pair, lambda p: lkd_loss(*p, _nan(8, D)), ValueError, "NaN or inf"),
    Case("ilkd-pair-out-of-range", _pair, lambda p: ilkd_loss(*p, _x(8, D), pairs=[(0, 9)]), IndexError,
         "out of range"),
    Case("lkd-teacher-in-training-mode", lambda: (_ready("maf")().train(), MAF(D, depth=1).train()),
         lambda p: lkd_loss(*p, _x(8, D)), RuntimeError, "teacher is in training mode"),
    # interpolation and temperature sweeps
    Case("interpolate-nan-alpha", lambda: None,
         lambda _: interpolate(_x(2, D), _x(2, D, seed=1), [0.0, float("nan")]), ValueError,
         "alpha must be finite"),
    Case("interpolate-images-nan-temperature", _ready("glow-image"),
         lambda m: interpolate_images(m, _x(2, *IMAGE), _x(2, *IMAGE, seed=1), temperature=float("nan")),
         ValueError, "temperature must be a finite number >= 0"),
    Case("interpolate-images-nan-image", _ready("glow-image"),
         lambda m: interpolate_images(m, _nan(2, *IMAGE), _x(2, *IMAGE, seed=1)), ValueError, "NaN or inf"),
    Case("interpolation-samples-negative-temperature", _ready("glow-image"),
         lambda m: interpolation_samples(m, _x(6, *IMAGE), 2, temperature=-1.0, progress=False), ValueError,
         "temperature must be a finite number >= 0"),
    Case("sample-at-temperatures-nan", _ready("glow-image"),
         lambda m: sample_at_temperatures(m, 2, temperatures=(0.5, float("nan"))), ValueError,
         "temperature must be a finite number >= 0"),
    # self-normalizing flows
    Case("selfnorm-exact-test-nll-nan", _ready("selfnorm-fc"), lambda m: exact_test_nll(m, _nan(5, D)),
         ValueError, "NaN or inf"),
]


# --- the test ----------------------------------------------------------------------------------------------

assert len({case.id for case in CASES}) == len(CASES), "two rows of CASES share an id"

def _modules(obj) -> list[nn.Module]:
    if obj is None:
        return []
    if isinstance(obj, nn.Module):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [m for item in obj for m in _modules(item)]


def _snapshot(obj):
    """Per module: its state_dict serialised with torch.save, a copy of each tensor, and every train flag."""
    out = []
    for module in _modules(obj):
        state = module.state_dict(keep_vars=False)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        copies = {k: v.detach().clone() for k, v in state.items()}
        out.append((buffer.getvalue(), copies, [m.training for m in module.modules()]))
    return out


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_and_changes_nothing(case: Case):
    obj = case.build()
    before = _snapshot(obj)
    with pytest.raises(case.error, match=case.match):
        case.call(obj)
    after = _snapshot(obj)
    assert len(after) == len(before)
    for (bytes_before, tensors_before, flags_before), (bytes_after, tensors_after, flags_after) in zip(
            before, after):
        assert tensors_after.keys() == tensors_before.keys()
        for key, value in tensors_before.items():
            assert torch.equal(tensors_after[key], value), f"{case.id}: {key} changed"
        assert bytes_after == bytes_before, f"{case.id}: the serialised state_dict changed"
        assert flags_after == flags_before, f"{case.id}: a train / eval flag changed"
