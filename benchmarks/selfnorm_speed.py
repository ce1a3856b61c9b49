"""Training-step time of exact vs self-normalizing dense layers (Self Normalizing Flows, Keller et al. 2021).

One training step = forward, backward and an optimizer step of a single dense flow layer ``z = W x`` under a
standard-normal NLL, batch 128:

* exact: ``SelfNormLinear(D, exact=True)``, log|det W| and its gradient through ``slogdet`` (O(D^3));
* SNF: ``SelfNormLinear(D)``, the official split likelihood gradient (``W``: half of ``dz x^T - R^T``,
  ``R``: half of ``-dx z^T + W^T``) and the reconstruction loss (O(D^2) per sample), on flowlib's fast path
  (one fused autograd node, :class:`flowlib.fused.SelfNormDenseFn`: six (N, D) x (D, D) products);
  ``--likelihood-grad forward`` times the one-sided variant;
* SNF reference: the same layer inside ``flowlib.fast_paths.disabled()`` (three autograd pieces, eleven
  products and a separate (D, D) gradient per term), to show what the fused node saves.

Repeats are interleaved (rotating which goes first) and medians reported, both of wall-clock and of process
CPU time; the growth exponent is the least-squares slope of log(time) against log(D). Torch's default thread
count by default (what a user gets); ``--threads 1`` for one thread. The optimizer is torch's ``Adam`` with
its defaults (``--optimizer adam``, on a CPU the per-tensor loop: about ten passes over each (D, D)
parameter and its moments, a large part of the SNF step at D = 4096, twice the exact step's since SNF has
two matrices) or ``Adam(fused=True)`` (``--optimizer adam-fused``, one pass). The speed-up is printed at
D = 784 (MNIST's dimension, the paper's), 2048 and 4096. The exact step's LU factorisation and solve grow as
D^3, the SNF step as N D^2, so the speed-up grows with D / N. ``--keep-heap`` serves every allocation from
glibc's heap and keeps freed memory (``peers.keep_heap``): by default each fresh (D, D) tensor of a step (the
gradients, Adam's temporaries) is a new 64 MB mapping at D = 4096 whose pages are faulted in on first write,
~20 ms each. Usage::

    python benchmarks/selfnorm_speed.py            # D = 256 ... 4096 and 784, a few minutes
    python benchmarks/selfnorm_speed.py --dims 256 512 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time

import torch
from peers import OPTIMIZERS, keep_heap  # benchmarks/peers.py: the same Adam settings and heap setting

from flowlib import fast_paths
from flowlib.results import atomic_write_json
from flowlib.selfnorm import SelfNormLinear, selfnorm_loss

METHODS = ("exact", "snf", "snf_reference")


def make_step(dim: int, exact: bool, batch: int, seed: int, likelihood_grad: str = "split",
              reference: bool = False, optimizer: str = "adam"):
    torch.manual_seed(seed)
    layer = (SelfNormLinear(dim, exact=True) if exact
             else SelfNormLinear(dim, likelihood_grad=likelihood_grad)).train()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-5, **OPTIMIZERS[optimizer])
    x = torch.randn(batch, dim)

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with fast_paths.disabled() if reference else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            z, logdet = layer(x)
            loss = (0.5 * z.pow(2).sum(1) - logdet).mean() + selfnorm_loss(layer)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    return step


def slope(xs, ys) -> float:
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def repeats_for(dim: int, base: int) -> int:
    return max(3, base if dim <= 1024 else base // 2 if dim <= 2048 else base // 3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 512, 784, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30, help="timed steps per method for D <= 1024 "
                    "(half for 2048, a third for 4096, at least 3)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own count, "
                    "what a user gets)")
    ap.add_argument("--likelihood-grad", default="split", choices=["split", "forward"],
                    help="the SNF layer's likelihood gradient (default: the official split)")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "adam-fused"],
                    help="torch.optim.Adam with its defaults, or Adam(fused=True) (same for every method)")
    ap.add_argument("--keep-heap", action="store_true",
                    help="serve every allocation from glibc's heap and keep freed memory (no page faults on "
                         "re-allocated (D, D) tensors); process-wide, both methods under it")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.keep_heap:
        keep_heap(mmap=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, float32, CPU, "
          f"optimizer {args.optimizer}, SNF likelihood gradient {args.likelihood_grad}"
          + ("; heap kept (--keep-heap)" if args.keep_heap else ""))
    print("wall: median wall-clock step time; cpu: median process CPU time (all threads), less sensitive to")
    print("other processes sharing the cores; speed-up = exact / SNF (flowlib's fast path); ref = SNF on its")
    print("plain-autograd reference (fast paths disabled)")
    print(f"{'D':>6} {'exact ms':>10} {'SNF ms':>10} {'ref ms':>10} {'speed-up':>9} {'ref sp-up':>9} "
          f"{'exact cpu':>10} {'SNF cpu':>10} {'speed-up':>9} {'reps':>5}")
    rows = []
    t_start = time.perf_counter()
    for dim in args.dims:
        steps = {"exact": make_step(dim, True, args.batch, 0, optimizer=args.optimizer),
                 "snf": make_step(dim, False, args.batch, 0, args.likelihood_grad, optimizer=args.optimizer),
                 "snf_reference": make_step(dim, False, args.batch, 0, args.likelihood_grad, reference=True,
                                            optimizer=args.optimizer)}
        for _ in range(args.warmup):
            for s in steps.values():
                s()
        times = {k: [] for k in METHODS}
        cpu = {k: [] for k in METHODS}
        reps = repeats_for(dim, args.repeats)
        for r in range(reps):
            for name in METHODS[r % 3:] + METHODS[:r % 3]:
                wall, c = steps[name]()
                times[name].append(wall)
                cpu[name].append(c)
        med = {k: statistics.median(v) for k, v in times.items()}
        mcpu = {k: statistics.median(v) for k, v in cpu.items()}
        row = {"dim": dim, "repeats": reps}
        for k in METHODS:
            row.update({f"{k}_s": med[k], f"{k}_cpu_s": mcpu[k], f"{k}_all_s": times[k]})
        rows.append(row)
        print(f"{dim:>6} {1e3 * med['exact']:>10.1f} {1e3 * med['snf']:>10.1f} "
              f"{1e3 * med['snf_reference']:>10.1f} "
              f"{med['exact'] / med['snf']:>8.2f}x {med['exact'] / med['snf_reference']:>8.2f}x "
              f"{1e3 * mcpu['exact']:>10.1f} {1e3 * mcpu['snf']:>10.1f} "
              f"{mcpu['exact'] / mcpu['snf']:>8.2f}x {reps:>5}", flush=True)
        del steps
    dims = [r["dim"] for r in rows]
    out = {"rows": rows, "batch": args.batch, "threads": torch.get_num_threads(),
           "likelihood_grad": args.likelihood_grad, "optimizer": args.optimizer, "keep_heap": args.keep_heap,
           "torch": torch.__version__}
    for clock, suffix in (("wall", "_s"), ("cpu", "_cpu_s")):
        if len(rows) >= 2:
            out[f"exponent_{clock}"] = {k: slope(dims, [r[k + suffix] for r in rows]) for k in METHODS}
            print(f"[{clock}] growth exponent (log-log slope over D = {dims[0]}..{dims[-1]}): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in out[f"exponent_{clock}"].items()))
        for r in rows:
            if r["dim"] in (784, 2048, 4096):
                print(f"[{clock}] speed-up at D = {r['dim']}: {r['exact' + suffix] / r['snf' + suffix]:.2f}x "
                      f"(reference {r['exact' + suffix] / r['snf_reference' + suffix]:.2f}x)")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        atomic_write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
