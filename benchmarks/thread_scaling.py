"""Which operations of a training step gain from a second thread (issue 17, item 4).

Profiles flowlib's MAF (or tabular Glow) training step -- ``-log_prob(x).mean()``, backward, Adam step -- at 1
and at N threads with ``torch.profiler`` and prints, per operator and input shape, the self CPU time per step
at each thread count and the gain (time at 1 thread / time at N). Operators that gain ~1x or less are where a
second thread is lost: small reductions, first writes into freshly allocated buffers, the optimizer's
per-tensor loop, the Python overhead of the autograd nodes. Step times (median of ``--repeats`` untraced
steps) come first. Usage::

    python benchmarks/thread_scaling.py                       # MAF, D = 63, batch 8192, 1 vs 2 threads
    python benchmarks/thread_scaling.py --batch 512 --arch glow --rows 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import profile

from flowlib.models import MAF, Glow


def build(arch: str, dim: int, depth: int, hidden: int) -> torch.nn.Module:
    if arch == "maf":
        return MAF(dim, depth=depth, hidden=hidden)
    return Glow((dim,), depth=depth, hidden=hidden)


def measure(args, threads: int) -> tuple[float, dict]:
    """Median step time (s) and {(operator, input shapes): (self CPU seconds per step, calls per step)}."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(args.arch, args.dim, args.depth, args.hidden).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.dim)

    def step():
        opt.zero_grad(set_to_none=True)
        (-model.log_prob(x).mean()).backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with profile(record_shapes=True) as prof:
        for _ in range(args.profiled):
            step()
    n = args.profiled
    ops = {(e.key, str(e.input_shapes)): (e.self_cpu_time_total * 1e-6 / n, e.count / n)
           for e in prof.key_averages(group_by_input_shape=True)}
    return statistics.median(times), ops


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["maf", "glow"], default="maf")
    ap.add_argument("--dim", type=int, default=63)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2, help="the thread count compared with 1 (default 2)")
    ap.add_argument("--repeats", type=int, default=15, help="untraced steps timed at each thread count")
    ap.add_argument("--profiled", type=int, default=10, help="steps traced by the profiler")
    ap.add_argument("--rows", type=int, default=25, help="operators shown (largest at 1 thread first)")
    args = ap.parse_args(argv)
    one, one_ops = measure(args, 1)
    many, many_ops = measure(args, args.threads)
    print(f"torch {torch.__version__}; {args.arch} D = {args.dim}, {args.depth} blocks of width "
          f"{args.hidden}, batch {args.batch}")
    print(f"training step: {1e3 * one:.2f} ms at 1 thread, {1e3 * many:.2f} ms at {args.threads} "
          f"({one / many:.2f}x)")
    print(f"{'operator':<28} {'input shapes':<52} {'calls':>5} {'1 thr us':>9} {f'{args.threads} thr us':>9} "
          f"{'gain':>5}")
    for key in sorted(one_ops, key=lambda k: -one_ops[k][0])[:args.rows]:
        t1, calls = one_ops[key]
        tn = many_ops.get(key, (float("nan"), 0))[0]
        print(f"{key[0][:28]:<28} {key[1][:52]:<52} {calls:>5g} {1e6 * t1:>9.0f} {1e6 * tn:>9.0f} "
              f"{t1 / tn if tn else float('nan'):>5.2f}")
    return {"step_1": one, "step_n": many, "threads": args.threads}


if __name__ == "__main__":
    main()
