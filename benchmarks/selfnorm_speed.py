"""Training-step time of exact vs self-normalizing dense layers (Self Normalizing Flows, Keller et al. 2021).

One training step = forward, backward and an Adam step of a single dense flow layer ``z = W x`` under a
standard-normal NLL, batch 128:

* exact: ``SelfNormLinear(D, exact=True)``, log|det W| and its gradient through ``slogdet`` (O(D^3));
* SNF: ``SelfNormLinear(D)``, the official split likelihood gradient (``W``: half of ``dz x^T - R^T``,
  ``R``: half of ``-dx z^T + W^T``) and the reconstruction loss (O(D^2) per sample); ``--likelihood-grad
  forward`` times the one-sided variant.

Exact and SNF repeats are interleaved (alternating which goes first) and medians reported, both of
wall-clock and of process CPU time; the growth exponent is the least-squares slope of log(time) against
log(D). Torch's default thread count by default (what a user gets); ``--threads 1`` for one thread. The
speed-up is printed at D = 784 (MNIST's dimension, the paper's) and 4096. At batch N the SNF step costs
about 9 N D^2 multiply-adds (the split gradient recomputes the map once) plus Adam on 2 D^2 parameters, the
exact step adds an LU factorisation and a solve (O(D^3)), so the speed-up grows with D / N. Usage::

    python benchmarks/selfnorm_speed.py            # D = 256 ... 4096 and 784, about 1 minute
    python benchmarks/selfnorm_speed.py --dims 256 512 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from flowlib.results import atomic_write_json
from flowlib.selfnorm import SelfNormLinear, selfnorm_loss


def make_step(dim: int, exact: bool, batch: int, seed: int, likelihood_grad: str = "split"):
    torch.manual_seed(seed)
    layer = (SelfNormLinear(dim, exact=True) if exact
             else SelfNormLinear(dim, likelihood_grad=likelihood_grad)).train()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-5)
    x = torch.randn(batch, dim)

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
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
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, float32, CPU")
    print("wall: median wall-clock step time; cpu: median process CPU time (all threads), less sensitive to")
    print("other processes sharing the cores")
    print(f"{'D':>6} {'exact ms':>10} {'SNF ms':>10} {'speed-up':>9} {'exact cpu':>10} {'SNF cpu':>10} "
          f"{'speed-up':>9} {'reps':>5}")
    rows = []
    t_start = time.perf_counter()
    for dim in args.dims:
        steps = {"exact": make_step(dim, True, args.batch, 0),
                 "snf": make_step(dim, False, args.batch, 0, args.likelihood_grad)}
        for _ in range(args.warmup):
            for s in steps.values():
                s()
        times = {"exact": [], "snf": []}
        cpu = {"exact": [], "snf": []}
        reps = repeats_for(dim, args.repeats)
        for r in range(reps):
            order = ("exact", "snf") if r % 2 == 0 else ("snf", "exact")
            for name in order:
                wall, c = steps[name]()
                times[name].append(wall)
                cpu[name].append(c)
        med = {k: statistics.median(v) for k, v in times.items()}
        mcpu = {k: statistics.median(v) for k, v in cpu.items()}
        rows.append({"dim": dim, "exact_s": med["exact"], "snf_s": med["snf"], "repeats": reps,
                     "exact_cpu_s": mcpu["exact"], "snf_cpu_s": mcpu["snf"],
                     "exact_all_s": times["exact"], "snf_all_s": times["snf"]})
        print(f"{dim:>6} {1e3 * med['exact']:>10.1f} {1e3 * med['snf']:>10.1f} "
              f"{med['exact'] / med['snf']:>8.2f}x {1e3 * mcpu['exact']:>10.1f} {1e3 * mcpu['snf']:>10.1f} "
              f"{mcpu['exact'] / mcpu['snf']:>8.2f}x {reps:>5}", flush=True)
        del steps
    dims = [r["dim"] for r in rows]
    out = {"rows": rows, "batch": args.batch, "threads": torch.get_num_threads(),
           "likelihood_grad": args.likelihood_grad}
    for clock, suffix in (("wall", "_s"), ("cpu", "_cpu_s")):
        if len(rows) >= 2:
            ee = slope(dims, [r["exact" + suffix] for r in rows])
            es = slope(dims, [r["snf" + suffix] for r in rows])
            out[f"exponent_{clock}"] = {"exact": ee, "snf": es}
            print(f"[{clock}] growth exponent (log-log slope over D = {dims[0]}..{dims[-1]}): "
                  f"exact {ee:.2f}, SNF {es:.2f}")
        if len(rows) >= 3:
            tail = rows[-2:]
            td = [r["dim"] for r in tail]
            ee = slope(td, [r["exact" + suffix] for r in tail])
            es = slope(td, [r["snf" + suffix] for r in tail])
            out[f"exponent_last2_{clock}"] = {"exact": ee, "snf": es}
            print(f"[{clock}] growth exponent between D = {td[0]} and {td[1]}: exact {ee:.2f}, SNF {es:.2f}")
        for r in rows:
            if r["dim"] in (784, 2048, 4096):
                print(f"[{clock}] speed-up at D = {r['dim']}: {r['exact' + suffix] / r['snf' + suffix]:.2f}x")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        atomic_write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
