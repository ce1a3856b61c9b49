"""Reusable output buffers for evaluation passes of tabular flows.

A tabular ``log_prob`` at batch 8192 makes about six fresh (N, D) or (N, hidden) tensors per flow step. On
the CPU, fresh buffers of a few megabytes come from newly mapped memory, and the page faults of touching
them cost about as much as the arithmetic itself (measured in ``benchmarks/README.md``). Without
gradients, nothing outside the pass keeps those intermediates, so :meth:`flowlib.models.Flow.log_prob`
runs the pass inside :func:`using` one :class:`Arena` per model, and the layers pass ``out=`` :func:`out`
to the operation making each intermediate: the second and later calls at the same batch size reuse the same
memory.

Only intermediates go into the arena; whatever a call returns is a fresh tensor. With gradients enabled,
or outside :func:`using`, :func:`out` is ``None``, so the operation allocates as usual.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from . import fast_paths

__all__ = ["Arena", "MAX_ELEMENTS", "active", "out", "using"]

# Inputs larger than this (elements) are evaluated without an arena: the arena keeps one pass's
# intermediates alive between calls (roughly 20 tensors the size of the input for a 5-step flow).
MAX_ELEMENTS = 1 << 21

_state = threading.local()


class Arena:
    """Buffers handed out in order during one pass and reused by the next pass with the same shapes.

    ``reset()`` starts a pass; ``take(shape, like)`` returns the next buffer of that shape, dtype and
    device (allocating it the first time). A pass at another batch size drops the old buffers.
    """

    def __init__(self):
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        self._cursor: dict[tuple, int] = {}
        self._rows: int | None = None

    def reset(self, rows: int) -> None:
        if rows != self._rows:
            self._buffers.clear()
            self._rows = rows
        self._cursor.clear()

    def take(self, shape, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(shape), like.dtype, like.device, torch.is_inference_mode_enabled())
        buffers = self._buffers.setdefault(key, [])
        i = self._cursor.get(key, 0)
        if i == len(buffers):
            buffers.append(torch.empty(shape, dtype=like.dtype, device=like.device))
        self._cursor[key] = i + 1
        return buffers[i]

    def nbytes(self) -> int:
        """Memory held between passes."""
        return sum(t.numel() * t.element_size() for ts in self._buffers.values() for t in ts)


def active() -> Arena | None:
    """The arena of the pass running on this thread, if any (never while gradients are recorded)."""
    if torch.is_grad_enabled() or not fast_paths.enabled():
        return None
    return getattr(_state, "arena", None)


def out(shape, like: torch.Tensor) -> torch.Tensor | None:
    """The ``out=`` buffer for an intermediate of ``shape`` like ``like``: the active arena's next one during
    an evaluation pass, else ``None`` (the operation allocates its result)."""
    arena = active()
    return None if arena is None else arena.take(shape, like)


@contextlib.contextmanager
def using(arena: Arena, rows: int):
    """Run one pass of ``rows`` samples with ``arena`` active on this thread. A pass nested inside another
    pass (a second model's ``log_prob`` called by the first) gets its own arena; the same arena is never
    entered twice at once, since its buffers would then be handed out twice."""
    previous = getattr(_state, "arena", None)
    if previous is arena:
        yield
        return
    arena.reset(rows)
    _state.arena = arena
    try:
        yield
    finally:
        _state.arena = previous
