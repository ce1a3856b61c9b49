"""What notebook 02 runs prints no warnings: the numerical checks read values, not graphs.

(The executed notebooks themselves are scanned for warnings in tests/test_notebooks.py, on the fast run.)
torch emits "Converting a tensor with requires_grad=True to a scalar" once per process, so each test here
catches it only when it is the first to trigger it: run on code that warns, at least the first one fails.
"""

import warnings

import torch

from flowlib.checks import logdet_error, model_report, perturb
from flowlib.models import MAF, Glow


def _models():
    g = torch.Generator().manual_seed(0)
    glow = Glow((1, 4, 4), levels=2, depth=1, hidden=8).double()
    glow.train()
    glow.encode(torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64) - 0.5)  # ActNorm initialisation
    maf = MAF(4, depth=2, hidden=8).double()
    maf.train()
    maf.encode(torch.randn(32, 4, generator=g, dtype=torch.float64))  # batch-norm statistics
    x_img = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) - 0.5
    x_tab = torch.randn(3, 4, generator=g, dtype=torch.float64)
    return [(perturb(glow, 0.05).eval(), x_img), (perturb(maf, 0.05).eval(), x_tab)]


def test_model_report_warns_nothing_and_still_measures():
    for model, x in _models():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "Converting a tensor with requires_grad=True to a scalar"
            report = model_report(model, x)
        assert set(report) == {"reconstruction_error", "logdet_error_encode", "logdet_error_decode"}
        assert all(isinstance(v, float) and 0 <= v < 1e-8 for v in report.values()), report


def test_logdet_error_accepts_a_log_det_that_carries_a_graph():
    maf = MAF(3, depth=1, hidden=8).double().eval()
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logdet = maf.encode(x).logdet
    assert logdet.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = logdet_error(lambda v: maf.encode(v).flat(), x, logdet)
    assert isinstance(err, float) and err < 1e-8
