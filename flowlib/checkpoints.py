"""Checkpoint files, written atomically with a checksum of their content and read back with it verified.

A checkpoint is a plain ``torch.save`` archive of a dict (``torch.load`` opens it); its ``checksum`` entry is
the SHA-256 of everything else it holds (:func:`_content_digest`). :func:`flowlib.train.train` writes
``best.pt`` and ``last.pt`` with :func:`save_checkpoint`; every reader goes through :func:`load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

from .results import atomic_write

__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "load_checkpoint", "remove_stale_temporaries",
           "save_checkpoint"]

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is unreadable (truncated, corrupt, not a flowlib checkpoint) or fails its checksum.
    The message names the file; deleting it makes :func:`train_or_load` retrain (or resume from
    ``last.pt``)."""


def _content_digest(obj, h=None) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes and every other value, dict
    keys in sorted order. It is computed from the loaded objects rather than the file's bytes, so the file
    stays a plain ``torch.save`` archive that ``torch.load`` opens, and any change to what it holds is
    detected."""
    top = h is None
    h = hashlib.sha256() if top else h
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _content_digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _content_digest(item, h)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r};".encode())
    return h.hexdigest() if top else ""


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """``torch.save`` through :func:`flowlib.results.atomic_write` (temporary file, then ``os.replace``),
    with a ``checksum`` of the content (:func:`_content_digest`) that :func:`load_checkpoint` verifies."""
    payload = {k: v for k, v in obj.items() if k != "checksum"}
    payload["checksum"] = _content_digest(payload)
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`train` (``weights_only``: plain tensors and containers) and verify
    its checksum. A truncated, corrupt or foreign file raises :class:`CheckpointError` naming it. Checkpoints
    written before checksums existed (no ``checksum`` key) load unverified."""
    fix = f"delete {path} to retrain (a run resumes from last.pt if only best.pt is damaged)"
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated zip, bad pickle, a byte flipped in a record header, ...
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {first}); "
                              f"it is truncated or corrupt: {fix}") from err
    if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a flowlib checkpoint of version {CHECKPOINT_VERSION}: {fix}")
    stored = ck.pop("checksum", None)
    if stored is not None and stored != _content_digest(ck):
        raise CheckpointError(f"checkpoint {path} fails its checksum: its content changed after it was "
                              f"written (a corrupt disk or copy): {fix}")
    return ck


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`flowlib.results.atomic_write` leaves behind when a process is
    killed mid-write (``.last.pt.<random>.tmp``). Call only while holding the folder (its training lock)."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed
