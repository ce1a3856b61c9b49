"""Self Normalizing Flows at the dimension they were made for: 28x28 images, D = 784 (notebook 09).

* :func:`load_images`: Fashion-MNIST (offline: 54,000 / 6,000 / 10,000) or the 5,000-image real MNIST
  subset, as uint8 (N, 1, 28, 28);
* :func:`preprocess_fn`: dequantisation and the logit map of the official code (``x / 256``, then
  ``logit(alpha + (1 - 2 alpha) x)`` with ``alpha = 1e-6``), flattened for the dense models;
* :func:`build`: the paper's two MNIST families at CPU size, exact and self-normalizing twins: ``"fc"``
  (ActNorm, dense ``W``, leaky ReLU; lambda = 1) and ``"glow"`` (Glow with 1x1 self-normalizing convolutions;
  lambda = 100), as in the official ``selfnorm_fc_mnist.py`` / ``selfnorm_glow_mnist.py``;
* :func:`data_nll`: the exact negative log-likelihood of the dequantised pixels (nats per image on the
  0..256 scale, the unit of the paper's MNIST tables) and :func:`bits_per_dim`;
* :func:`block_pairs`: ILKD's matched points for dense students and teachers of different depths;
* :func:`paired_interval` (from :mod:`flowlib.metrics`, re-exported): the mean paired difference over seeds
  with its t confidence interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .bijectors import ImagePreprocess, cached_weights, dequantize
from .distill import bits_per_dim_from_log_prob
from .metrics import paired_interval  # noqa: F401  (re-exported: notebooks and tests import it here)

__all__ = ["ALPHA", "DIM", "bits_per_dim", "block_pairs", "build", "data_nll", "format_interval",
           "load_images", "paired_interval", "preprocess_fn"]

DIM = 28 * 28
ALPHA = 1e-6  # the official code's logit offset
PREPROCESS = ImagePreprocess("logit", alpha=ALPHA)
SETS = ("fashion-mnist", "mnist-5k")


def load_images(name: str = "fashion-mnist", seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"train", "val", "test"}`` uint8 images (N, 1, 28, 28) of ``name`` (see :mod:`flowlib.data`)."""
    from . import data

    if name not in SETS:
        raise ValueError(f"unknown image set {name!r} for the 784-D study; choose one of {', '.join(SETS)}")
    splits = data.load_splits(name, seed=seed)
    return {split: splits[split] for split in ("train", "val", "test")}


def preprocess_fn(flat: bool) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """``f(images, generator)``: uniform dequantisation with ``generator``, then the logit map; (N, 784)
    rows when ``flat`` (the dense models), else (N, 1, 28, 28)."""
    def to_model_space(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        y, _ = PREPROCESS(dequantize(images, 256, generator=generator))
        return y.reshape(len(y), -1) if flat else y

    return to_model_space


@torch.no_grad()
def data_nll(model: nn.Module, images: torch.Tensor, flat: bool, seed: int = 1234,
             batch_size: int = 1000) -> torch.Tensor:
    """Per-image exact ``-log p(x + u)`` in nats of the dequantised pixels on ``[0, 256)^784`` (one fixed
    dequantisation draw from ``seed``): the model's exact log-density (eval mode: every self-normalizing
    layer's ``log|det W|`` through ``slogdet``) plus the logit map's Jacobian and ``D log 256``. The model's
    training flag is restored."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    to_model = preprocess_fn(flat)
    parts = []
    try:
        with cached_weights(model):
            for xb in images.split(batch_size):
                y = to_model(xb, g)
                bpd = bits_per_dim_from_log_prob(model.log_prob(y), y, PREPROCESS, bins=256)
                parts.append(bpd.double() * DIM * math.log(2.0))
    finally:
        model.train(was_training)
    return torch.cat(parts)


def bits_per_dim(nats_per_image: float) -> float:
    return nats_per_image / (DIM * math.log(2.0))


def build(kind: str, exact: bool, fc_layers: int = 2, glow_levels: int = 2, glow_depth: int = 4,
          glow_hidden: int = 64, **options) -> nn.Module:
    """A 784-D model of ``kind`` ``"fc"`` or ``"glow"``, exact-gradient (``exact=True``) or self-normalizing.

    The reconstruction weights are the official code's defaults for each family (``SelfNormFC``: 1,
    ``SelfNormGlow``: 100); ``options`` (``likelihood_grad``, ``sym_recon``, ``recon_lr``,
    ``recon_weight``...) go to the self-normalizing layers."""
    from .selfnorm import SelfNormFC, SelfNormGlow

    if kind == "fc":
        return SelfNormFC(DIM, layers=fc_layers, exact=exact, **options)
    if kind == "glow":
        return SelfNormGlow((1, 28, 28), levels=glow_levels, depth=glow_depth, hidden=glow_hidden,
                            exact=exact, **options)
    raise ValueError(f"unknown model kind {kind!r}; choose 'fc' or 'glow'")


def block_pairs(student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """ILKD points ``(student_index, teacher_index)`` for dense flows whose ``latents`` are their blocks'
    outputs: student block ``i`` meets the teacher block at the same depth fraction,
    ``ceil((i + 1) T / S) - 1`` (the official MAF pairing: with 9 and 3 blocks, student block ``j`` meets
    teacher block ``3 j``, counted from 1); the last pair is the final latent of both."""
    if not 1 <= student_blocks <= teacher_blocks:
        raise ValueError(f"need 1 <= student_blocks <= teacher_blocks, got {student_blocks}, "
                         f"{teacher_blocks}")
    return [(i, math.ceil((i + 1) * teacher_blocks / student_blocks) - 1) for i in range(student_blocks)]


def format_interval(ci: dict, digits: int = 1) -> str:
    """``"+3.5 [-19.1, +12.1]"`` for a :func:`paired_interval`, or ``"+3.5 (one seed: no interval)"``."""
    if ci["low"] is None:
        return f"{ci['mean']:+.{digits}f} (one seed: no interval)"
    return f"{ci['mean']:+.{digits}f} [{ci['low']:+.{digits}f}, {ci['high']:+.{digits}f}]"
