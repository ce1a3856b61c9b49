"""flowlib against the flow libraries people would use instead: nflows, zuko and normflows (issue 9).

For MAF (``--blocks`` blocks of MADE(2 x ``--hidden``)) and a tabular Glow (the same number of steps: ActNorm,
LU linear, affine coupling with an MLP(2 x hidden) conditioner) at D = 10 and 63, times

* a training step: ``-log_prob(x).mean()``, backward, Adam step (batch 512 and 8192; ``--optimizer``: torch's
  default Adam, the multi-tensor ``foreach`` kernels ``flowlib.train`` uses, or ``fused``, for every library),
* ``log_prob`` under ``torch.inference_mode`` (batch 512 and 8192),
* sampling 8192 points (eval mode; MAF decodes its D features one after another).

Every library builds the same architecture at (nearly) the same parameter count, printed beside each time
(free parameters: flowlib's LU factors are stored as full matrices, and their structural zeros are not
counted).
Where a library lacks a piece, the closest model it offers is used and said so: zuko has no ActNorm / LU
layer, so its "Glow" is its RealNVP (affine couplings with the same conditioner), and its MAF has no batch
norm. The repeats are interleaved (one call of each library per round, in a new random order every round)
so that drift on a shared machine, and whatever the previous call leaves in the caches, hits every library
alike; the table reports medians and flowlib's time over the fastest peer's.
Before timing, every model's log-probabilities on the batch are checked to be finite.

Peer libraries are the ``bench`` extra: ``pip install -e .[bench]``. A library that is not installed is
skipped with a note. Usage::

    python benchmarks/peers.py [--threads 1] [--repeats 15] [--dims 10 63] [--batches 512 8192]
                               [--sample 8192] [--keep-heap] [--optimizer adam-foreach]
                               [--json results/benchmarks/peers.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import statistics
import sys
import time

import torch
from torch import nn

from flowlib.models import MAF, Glow, count_parameters

EQUAL_SIZE = 0.10  # peers within 10% of flowlib's parameter count are "of equal size"
LIBRARIES = ("flowlib", "flowlib-nobn", "nflows", "zuko", "zuko-wide", "normflows")


# --- one adapter per library: log_prob(x) and sample(n) on a model built for (arch, D) ----------------------

class Adapter:
    """``family`` names the architecture exactly (e.g. MAF with or without batch norm): flowlib is compared
    with the fastest peer of its own family and, more conservatively, with the fastest peer of any."""

    def __init__(self, module: nn.Module, log_prob, sample, note: str = "", family: str = ""):
        self.module, self.log_prob, self.sample, self.note = module, log_prob, sample, note
        self.family = family

    @property
    def params(self) -> int:
        return free_parameters(self.module)


def free_parameters(module: nn.Module) -> int:
    """Trainable parameters, not counting the entries of flowlib's LU factors that are structurally zero
    (``InvertibleLinear`` stores L and U as full D x D matrices and masks them; nflows and normflows store
    only the triangles). Masked MADE weights are counted in full, as every library stores them."""
    from flowlib.bijectors import InvertibleLinear

    n = count_parameters(module)
    for m in module.modules():
        if isinstance(m, InvertibleLinear):
            d = m.features
            n -= 2 * (d * d - d * (d - 1) // 2)  # the diagonal and the other triangle of L and of U
    return n


def build_flowlib(arch: str, d: int, blocks: int, hidden: int, batch_norm: bool = True) -> Adapter | None:
    if arch == "maf":
        model = MAF(d, depth=blocks, hidden=hidden, batch_norm=batch_norm)
        family = "maf+bn" if batch_norm else "maf"
    elif batch_norm:
        model, family = Glow((d,), depth=blocks, hidden=hidden), "glow"
    else:
        return None  # a Glow has no batch norm to leave out
    return Adapter(model, model.log_prob, lambda n: model.sample(n), family=family)


def build_flowlib_nobn(arch: str, d: int, blocks: int, hidden: int) -> Adapter | None:
    return build_flowlib(arch, d, blocks, hidden, batch_norm=False)


class _IgnoreContext(nn.Module):
    """nflows' coupling layers call their network as ``net(x, context)``; its plain MLP takes ``x`` only."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, context=None):
        return self.net(x)


def build_nflows(arch: str, d: int, blocks: int, hidden: int) -> Adapter:
    from nflows import distributions, flows, transforms
    from nflows.nn import nets

    layers = []
    for k in range(blocks):
        if arch == "maf":
            # nflows' MADE: input layer, num_blocks - 1 hidden-to-hidden layers, output layer
            layers += [transforms.MaskedAffineAutoregressiveTransform(
                features=d, hidden_features=hidden, num_blocks=1, use_residual_blocks=False),
                transforms.BatchNorm(d), transforms.ReversePermutation(d)]
        else:
            mask = torch.arange(d) % 2 == k % 2
            layers += [transforms.ActNorm(d), transforms.LULinear(d, identity_init=False),
                       transforms.AffineCouplingTransform(
                           mask.int() * 2 - 1,
                           lambda i, o: _IgnoreContext(nets.MLP((i,), (o,), hidden_sizes=[hidden, hidden])))]
    flow = flows.Flow(transforms.CompositeTransform(layers), distributions.StandardNormal((d,)))
    return Adapter(flow, flow.log_prob, flow.sample, family="maf+bn" if arch == "maf" else "glow")


def build_zuko(arch: str, d: int, blocks: int, hidden: int) -> Adapter:
    import zuko

    if arch == "maf":
        flow = zuko.flows.MAF(d, transforms=blocks, hidden_features=(hidden, hidden))
        note, family = "no batch norm", "maf"
    else:
        flow = zuko.flows.RealNVP(d, transforms=blocks, hidden_features=(hidden, hidden))
        note, family = "RealNVP: no ActNorm / LU layer in zuko", "realnvp"
    return Adapter(flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,)), note, family)


def build_zuko_wide(arch: str, d: int, blocks: int, hidden: int) -> Adapter | None:
    """zuko's RealNVP widened until it has as many parameters as the Glow (its LU layers and ActNorm are
    what the same-width RealNVP lacks): the equal-size comparison the issue asks for."""
    if arch != "glow":
        return None
    import zuko

    target = free_parameters(build_flowlib(arch, d, blocks, hidden).module)
    width = hidden
    while True:
        flow = zuko.flows.RealNVP(d, transforms=blocks, hidden_features=(width, width))
        if count_parameters(flow) >= target:
            break
        width += 1
    return Adapter(flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,)),
                   f"RealNVP widened to hidden {width} to match the Glow's parameter count", "realnvp")


def build_normflows(arch: str, d: int, blocks: int, hidden: int) -> Adapter:
    import normflows as nf

    layers = []
    for _ in range(blocks):
        if arch == "maf":
            # normflows' BatchNorm has no inverse (so no log_prob): the blocks go without it
            made = nf.flows.MaskedAffineAutoregressive(d, hidden, num_blocks=1, use_residual_blocks=False)
            layers += [made, nf.flows.Permute(d, mode="swap")]
        else:
            d1 = (d + 1) // 2  # normflows splits channels with chunk(2): the first part is the larger
            layers += [nf.flows.ActNorm((d,)), nf.flows.LULinearPermute(d, identity_init=False),
                       nf.flows.AffineCouplingBlock(nf.nets.MLP([d1, hidden, hidden, 2 * (d - d1)],
                                                                init_zeros=True), scale_map="sigmoid")]
    flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(d, trainable=False), layers)
    if arch == "maf":
        note = ("no batch norm (normflows' BatchNorm cannot be inverted); its MAF layer runs the masked "
                "network "
                "once when sampling and D times in log_prob (the inverse autoregressive direction)")
        family = "iaf"
    else:
        note, family = "", "glow"
    return Adapter(flow, flow.log_prob, lambda n: flow.sample(n)[0], note, family)


BUILDERS = {"flowlib": build_flowlib, "flowlib-nobn": build_flowlib_nobn, "nflows": build_nflows,
            "zuko": build_zuko, "zuko-wide": build_zuko_wide, "normflows": build_normflows}


def available(name: str) -> bool:
    return name.startswith("flowlib") or importlib.util.find_spec(name.split("-")[0]) is not None


# --- timing ----------------------------------------------------------------------------------------------

def train_step(adapter: Adapter, x: torch.Tensor, optimizer):
    def step():
        loss = -adapter.log_prob(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def log_prob_call(adapter: Adapter, x: torch.Tensor):
    def run():
        with torch.inference_mode():
            adapter.log_prob(x)
    return run


def sample_call(adapter: Adapter, n: int):
    def run():
        with torch.inference_mode():
            adapter.sample(n)
    return run


def interleaved(calls: dict, repeats: int, warmup: int = 2, seed: int = 0) -> dict[str, list[float]]:
    """Run every call ``warmup`` times, then ``repeats`` rounds of one call each, in a new (seeded) random
    order every round; seconds per call. A fixed order would always run a library right after the same other
    one, and what that one leaves in the caches and the allocator counts against it: measured at D = 63,
    batch 8192, flowlib's MAF step was 0.73x zuko's when it always followed normflows' (a 3 s step that
    churns through memory) and 0.70x when it followed another flowlib model."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order, rng = list(calls), random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            fn = calls[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def check_finite(adapters: dict[str, Adapter], x: torch.Tensor) -> None:
    for name, a in adapters.items():
        with torch.no_grad():
            lp = a.log_prob(x)
        if lp.shape != (x.shape[0],) or not torch.isfinite(lp).all():
            raise AssertionError(f"{name}: log_prob gave shape {tuple(lp.shape)} / non-finite values")


def build_all(names, arch, d, blocks, hidden, seed):
    adapters = {}
    for name in names:
        torch.manual_seed(seed)
        adapter = BUILDERS[name](arch, d, blocks, hidden)
        if adapter is not None:
            adapters[name] = adapter
    return adapters


def warm_init(adapters: dict[str, Adapter], x: torch.Tensor) -> None:
    """One training-mode pass so data-dependent initialisation (ActNorm) has run, as in real training."""
    for a in adapters.values():
        a.module.train()
        with torch.no_grad():
            a.log_prob(x)


OPTIMIZERS = {  # --optimizer: the same for every library
    "adam": {},  # torch's defaults: on a CPU the per-tensor loop
    "adam-foreach": {"foreach": True},  # the multi-tensor kernels flowlib.train uses
    "adam-fused": {"fused": True},
}


def bench_case(names, arch, d, blocks, hidden, batches, sample_n, repeats, seed=0,
               ops=("train", "log_prob", "sample"), optimizer="adam"):
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for batch in batches if {"train", "log_prob"} & set(ops) else []:
        x = torch.randn(batch, d, generator=gen)
        adapters = build_all(names, arch, d, blocks, hidden, seed)
        warm_init(adapters, x)
        check_finite(adapters, x)
        for a in adapters.values():
            a.module.train()
        if "train" in ops:
            opts = {n: torch.optim.Adam(a.module.parameters(), lr=1e-4, **OPTIMIZERS[optimizer])
                    for n, a in adapters.items()}
            times = interleaved({n: train_step(a, x, opts[n]) for n, a in adapters.items()}, repeats)
            rows += _rows(adapters, times, arch, d, "train step", batch)
        for a in adapters.values():
            a.module.eval()
        if "log_prob" in ops:
            times = interleaved({n: log_prob_call(a, x) for n, a in adapters.items()}, repeats)
            rows += _rows(adapters, times, arch, d, "log_prob", batch)
    if "sample" not in ops:
        return rows
    adapters = build_all(names, arch, d, blocks, hidden, seed)
    warm_init(adapters, torch.randn(512, d, generator=gen))
    for a in adapters.values():
        a.module.eval()
    sample_repeats = max(3, repeats // 3) if arch == "maf" else repeats
    times = interleaved({n: sample_call(a, sample_n) for n, a in adapters.items()}, sample_repeats, warmup=1)
    rows += _rows(adapters, times, arch, d, "sample", sample_n)
    return rows


def _rows(adapters, times, arch, d, op, batch):
    medians = {n: statistics.median(t) for n, t in times.items()}
    peers = {n: m for n, m in medians.items() if not n.startswith("flowlib")}
    out = []
    for n, m in medians.items():
        row = {"arch": arch, "D": d, "op": op, "batch": batch, "library": n, "family": adapters[n].family,
               "params": adapters[n].params, "median_ms": 1e3 * m, "iqr_ms": 1e3 * _iqr(times[n]),
               "repeats": len(times[n]), "note": adapters[n].note}
        if n.startswith("flowlib") and peers:
            fastest = min(peers, key=peers.get)
            row.update(fastest_peer=fastest, ratio_to_fastest_peer=m / peers[fastest])
            size = adapters[n].params
            equal = {p: t for p, t in peers.items() if abs(adapters[p].params / size - 1) <= EQUAL_SIZE}
            if equal:
                best = min(equal, key=equal.get)
                row.update(fastest_equal_size_peer=best, ratio_to_fastest_equal_size_peer=m / equal[best])
        out.append(row)
    return out


def _iqr(values):
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return q[2] - q[0]


def print_table(rows):
    libs = [n for n in LIBRARIES if any(r["library"] == n for r in rows)]
    print(f"{'arch':5} {'D':>3} {'op':10} {'batch':>5} | " + " | ".join(f"{n:>19}" for n in libs)
          + " | flowlib / fastest peer of equal size (within 10% of the parameters); of any size")
    keys = list(dict.fromkeys((r["arch"], r["D"], r["op"], r["batch"]) for r in rows))
    for k in keys:
        cells, ratios = [], []
        for n in libs:
            match = [r for r in rows if (r["arch"], r["D"], r["op"], r["batch"]) == k and r["library"] == n]
            cells.append(f"{match[0]['median_ms']:9.2f} ms ({match[0]['params'] / 1e3:4.1f}K)" if match
                         else f"{'-':>19}")
            if match and "ratio_to_fastest_peer" in match[0]:
                r = match[0]
                equal = (f"{r['ratio_to_fastest_equal_size_peer']:.2f}x {r['fastest_equal_size_peer']}"
                         if "ratio_to_fastest_equal_size_peer" in r else "-")
                ratios.append(f"{n}: {equal}; {r['ratio_to_fastest_peer']:.2f}x {r['fastest_peer']}")
        print(f"{k[0]:5} {k[1]:>3} {k[2]:10} {k[3]:>5} | " + " | ".join(cells) + " | " + "  ".join(ratios))


def keep_heap(mmap_threshold: int = 64 << 20, trim_threshold: int = 512 << 20, mmap: bool = True) -> None:
    """Make glibc serve allocations up to ``mmap_threshold`` bytes from the heap and keep up to
    ``trim_threshold`` bytes of freed heap instead of returning it. By default glibc gives the top of the
    heap back after every training step (the step frees its activations) and the next step faults the pages
    in again, 2,000-5,000 minor faults per MAF step at batch 8192. ``mmap=False`` serves every allocation,
    however large, from the heap (glibc maps blocks above 32 MB on their own whatever the threshold, and
    unmaps them when freed). Process-wide: every library is timed under the same setting."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        raise SystemExit("--keep-heap needs glibc's mallopt (Linux); run without --keep-heap on this system")
    m_trim, m_mmap = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD in glibc's malloc.h
    if not (libc.mallopt(m_mmap, mmap_threshold) and libc.mallopt(m_trim, trim_threshold)):
        raise SystemExit("mallopt refused the thresholds; run without --keep-heap")
    m_mmap_max = -4  # M_MMAP_MAX: how many blocks glibc may map on their own
    if not mmap and not libc.mallopt(m_mmap_max, 0):
        raise SystemExit("mallopt refused M_MMAP_MAX = 0; run without --keep-heap")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--dims", type=int, nargs="+", default=[10, 63])
    p.add_argument("--batches", type=int, nargs="+", default=[512, 8192])
    p.add_argument("--sample", type=int, default=8192)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--archs", nargs="+", default=["maf", "glow"], choices=["maf", "glow"])
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    p.add_argument("--ops", nargs="+", default=["train", "log_prob", "sample"],
                   choices=["train", "log_prob", "sample"])
    p.add_argument("--keep-heap", action="store_true",
                   help="stop glibc from returning freed memory to the system (for every library in the "
                        "process): times without the page faults of re-growing the heap every step")
    p.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS),
                   help="the training step's Adam for every library: torch's defaults (a per-tensor loop on "
                        "a CPU), the multi-tensor kernels flowlib.train uses (adam-foreach), or fused")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_heap:
        keep_heap()
    names = [n for n in args.libraries if available(n)]
    for n in set(args.libraries) - set(names):
        print(f"note: {n} is not installed (pip install -e .[bench]); skipped", file=sys.stderr)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()} "
          f"with {os.cpu_count()} cpus; "
          f"{args.blocks} blocks, hidden {args.hidden}; medians of {args.repeats} interleaved repeats"
          + ("; heap kept (--keep-heap)" if args.keep_heap else "") + f"; optimizer {args.optimizer}")
    rows = []
    for arch in args.archs:
        for d in args.dims:
            rows += bench_case(names, arch, d, args.blocks, args.hidden, args.batches, args.sample,
                               args.repeats, ops=args.ops, optimizer=args.optimizer)
    print_table(rows)
    notes = {(r["arch"], r["library"]): r["note"] for r in rows if r["note"]}
    for (arch, lib), note in sorted(notes.items()):
        print(f"  {lib} {arch}: {note}")
    if args.json:
        from flowlib.results import atomic_write_json

        atomic_write_json(args.json, {"threads": args.threads, "torch": torch.__version__,
                                      "keep_heap": args.keep_heap, "optimizer": args.optimizer,
                                      "machine": f"{platform.machine()} ({os.cpu_count()} cpus)",
                                      "rows": rows, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return rows


if __name__ == "__main__":
    main()
