"""Data-parallel training on several processes (GPUs, or CPU cores) with ``torch.distributed``.

One process per device, launched by ``torchrun``::

    torchrun --nproc_per_node 4 -m flowlib.train_ddp --config run.json --checkpoint-root checkpoints

``run.json`` holds a :class:`flowlib.train.TrainConfig` (its ``to_dict()``; the ``config`` of any
``last.pt`` is one). Every rank runs :func:`flowlib.train.train` with a :class:`DataParallel`: all ranks
draw the same global batch of ``config.batch_size`` rows from the same seeded stream and each keeps its
share (``batch_size`` must divide by the number of processes), the student is wrapped in
:class:`torch.nn.parallel.DistributedDataParallel` (gradients averaged across ranks during the backward
pass), and rank 0 alone writes the checkpoints, into the same run directory and format as single-process
training (:func:`flowlib.train.train_or_load`). So N processes take the same steps as one process with
the whole batch, up to the rounding of the gradient average, and either can resume the other's run. A
distilled config needs its teacher trained first (``train_or_load`` or this command on the teacher's
config): every rank loads it, frozen, and runs it on its own share of the batch.

The backend is NCCL when the config's device is CUDA, gloo otherwise (which is how the tests run two
processes on a CPU). Limits, each refused with an error: SKD (its noise is drawn per batch from the
training generator, which the ranks share), and MAF (its batch norm would normalise each rank's share
with that share's statistics, a different model from the one-process batch; GLOW's ActNorm is initialised
from the whole first batch on every rank, so GLOW is exact).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .distill import PRESETS, distillation_loss, resolve_method

__all__ = ["DataParallel", "train_distributed", "main"]


class _Loss(nn.Module):
    """Eq. 15 as a module whose only parameters are the student's, so DistributedDataParallel can wrap it
    (DDP averages the gradients of the parameters it wraps when the backward pass reaches them)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, teacher, y, kwargs):
        return distillation_loss(teacher, self.student, y, **kwargs)


class DataParallel:
    """What :func:`flowlib.train.train` needs to run as one rank of an initialised process group."""

    def __init__(self, device: torch.device | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DataParallel needs an initialised torch.distributed process group: launch "
                               "with torchrun (python -m flowlib.train_ddp), or call "
                               "torch.distributed.init_process_group first")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device
        self._wrapped: nn.Module | None = None
        self._student: nn.Module | None = None

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints and shows progress; the others only train."""
        return self.rank == 0

    def check(self, config) -> None:
        """Refuse what this data-parallel scheme does not reproduce exactly (see the module docstring)."""
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} does not divide by the {self.world} processes: "
                             f"choose a multiple of {self.world}")
        lam = config.lambdas if config.lambdas is not None else PRESETS[resolve_method(config.method)].lambdas
        if float(lam[2]) != 0:
            raise ValueError("SKD is not supported by flowlib.train_ddp: its noise is drawn from the "
                             "training generator every rank shares; train SKD students in one process")
        if config.arch == "maf":
            raise ValueError("MAF is not supported by flowlib.train_ddp: its batch norm would use each "
                             "rank's share of the batch for its statistics; train MAF in one process (GLOW "
                             "is exact)")

    def shard(self, model: nn.Module, y: torch.Tensor, pre_logdet: torch.Tensor | None):
        """This rank's rows of the global batch ``y`` (contiguous blocks, rank 0 first). Before the first
        step an uninitialised ActNorm is initialised from the whole batch, as in one process."""
        if any(not bool(m.initialized) for m in model.modules()
               if isinstance(getattr(m, "initialized", None), torch.Tensor)):
            with torch.no_grad():
                model.encode(y)
        n = y.shape[0] // self.world
        rows = slice(self.rank * n, (self.rank + 1) * n)
        return y[rows], None if pre_logdet is None else pre_logdet[rows]

    def loss(self, teacher, student, y, **kwargs):
        """Eq. 15 on this rank's share, through DistributedDataParallel (built on the first call, after
        any resume or ActNorm initialisation, from rank 0's weights)."""
        if self._student is not student:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
            self._wrapped = DistributedDataParallel(_Loss(student), device_ids=ids)
            self._student = student
        return self._wrapped(teacher, y, kwargs)

    def barrier(self) -> None:
        dist.barrier()

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (so that all ranks stop together)."""
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() == 1.0)

    def agree(self, value: float, what: str) -> None:
        """Raise on every rank unless all ranks hold the same ``value`` (e.g. read different checkpoints
        because another process was still writing them)."""
        t = torch.tensor([value, -value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        low, high = float(t[0]), -float(t[1])
        if low != high:
            raise RuntimeError(f"the {self.world} processes disagree on {what} ({low:g} to {high:g}): "
                               f"another run may be writing the same checkpoints; stop it and start again")

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each logged value (equal shares: the whole batch's value)."""
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def train_distributed(config, data_fn=None, checkpoint_root: str | os.PathLike = "checkpoints",
                      progress: bool = True):
    """Train ``config`` as one rank of the running process group (``torchrun`` sets it up; this function
    initialises the group from the environment if needed). Returns ``(model, history)`` on every rank,
    with the best-validation weights, as :func:`flowlib.train.train_or_load` does."""
    from . import train as T

    device = T.resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        config = config.replace(device=str(device))  # not part of the run's identity
    if not dist.is_initialized():
        dist.init_process_group(_backend(device))
    parallel = DataParallel(device)
    parallel.check(config)  # before any data is read
    directory = T._run_directory(config, checkpoint_root)
    if parallel.is_writer:
        directory.mkdir(parents=True, exist_ok=True)
    parallel.barrier()
    return T._train_new(config, data_fn, checkpoint_root, progress, "best", directory, distributed=parallel)


def _tensor_data(path: Path):
    """``data_fn`` for a ``torch.save``d ``{"train": tensor, "val": tensor}`` file (``--data``)."""
    splits = torch.load(path, weights_only=True)
    missing = {"train", "val"} - set(splits)
    if missing:
        raise ValueError(f"{path} has no {sorted(missing)} split(s); it should hold 'train' and 'val' "
                         f"tensors")
    return lambda name, split: splits[split]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m flowlib.train_ddp",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True,
                        help="a TrainConfig as JSON (TrainConfig.to_dict(); a last.pt's 'config')")
    parser.add_argument("--checkpoint-root", default="checkpoints")
    parser.add_argument("--data", type=Path, default=None,
                        help="a torch.save'd {'train': tensor, 'val': tensor} instead of the loader of "
                             "config.dataset")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from .train import TrainConfig

    try:
        config = TrainConfig.from_dict(json.loads(args.config.read_text()))
    except (OSError, ValueError, TypeError) as err:
        print(f"error: cannot read a TrainConfig from {args.config}: {err}", file=sys.stderr)
        return 2
    data_fn = _tensor_data(args.data) if args.data else None
    try:
        _, history = train_distributed(config, data_fn, args.checkpoint_root, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:  # a missing teacher or data set, a refused config
        print(f"error (rank {os.environ.get('RANK', 0)}): {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        best = min((h["val_nll"] for h in history if h["val_nll"] == h["val_nll"]), default=float("nan"))
        print(f"{config.name}: {history[-1]['step'] if history else 0} steps, best validation NLL {best:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
