"""The switch between flowlib's fast paths and the plain PyTorch reference code.

Every layer of :mod:`flowlib.bijectors` computes its forward pass in one of two ways: the fast path (fused
autograd nodes of :mod:`flowlib.fused`, in-place evaluation, scratch buffers of :mod:`flowlib.scratch`,
cached weight-derived tensors, GLOW's ActNorm folded into the mixing matrix, MAF's incremental decoding) or
its ``reference_forward``: the formula in plain PyTorch, the code a notebook shows. They compute the same
function (``tests/test_reference_paths.py``: values equal to 1e-12 in float64, training gradients to 1e-5 in
float32). The fast paths are on by default; to debug with the reference alone::

    from flowlib import fast_paths

    with fast_paths.disabled():
        loss = -model.log_prob(x).mean()   # every layer runs its reference code
        loss.backward()

The setting is per thread (the training loop's); autograd's backward of a pass uses the nodes the forward
recorded, whichever path made them.
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["disabled", "enabled"]

_state = threading.local()


def enabled() -> bool:
    """Whether layers take their fast paths on this thread (True unless inside :func:`disabled`)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def disabled():
    """Run every layer on its plain PyTorch reference inside the block (no fused nodes, no scratch buffers,
    no weight caches); the previous setting comes back on leaving it. Blocks nest."""
    previous = enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = previous
