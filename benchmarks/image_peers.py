"""flowlib's image GLOW against normflows' multiscale Glow and FrEIA's modules at equal size (issue 17).

Cases: the notebooks' image models on fashion-mnist-16 (1 x 16 x 16, L = 2 levels, teacher K = 8 and student
K = 2 steps per level, 64 hidden channels) and a CIFAR-like 3 x 32 x 32 model (L = 3, K = 8, 128 channels).
normflows builds the same multi-scale architecture from its parts (``GlowBlock`` = affine coupling with a
3x3 / 1x1 / 3x3 convolutional network, LU 1x1 convolution and ActNorm; ``Squeeze``; ``Merge``;
``MultiscaleFlow``), as its Glow example does; its split-off halves get a learned per-level Gaussian
(``GlowBase``) where flowlib's get a learned conditional prior, so the parameter counts (printed) differ by a
few percent. If FrEIA is installed (the ``bench`` extra), its modules make a third model of the same layout
(:class:`FreiaGlow`; FrEIA's ``AllInOneBlock`` mixes channels with a fixed random orthogonal 1x1 convolution,
as it has no learned LU one). Times, interleaved in one process (one call of each library per round, in a new
random order every round), medians over ``--repeats`` rounds:

* a training step at batch ``--batch`` (``-log_prob(x).mean()``, backward, Adam step; ``--optimizer`` as in
  ``peers.py``, the same for every library),
* sampling ``--batch`` images at temperature 0.7 (eval mode, no gradients).

Usage::

    python benchmarks/image_peers.py [--threads 2] [--repeats 9] [--batch 64] [--json results/benchmarks/...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics

import torch
from peers import OPTIMIZERS, interleaved  # benchmarks/peers.py: seeded random order every round

from flowlib.models import Glow

CASES = {  # name: (shape, levels, depth, hidden)
    "fashion-mnist-16 teacher": ((1, 16, 16), 2, 8, 64),
    "fashion-mnist-16 student": ((1, 16, 16), 2, 2, 64),
    "CIFAR-like": ((3, 32, 32), 3, 8, 128),
}


def normflows_glow(shape, levels: int, depth: int, hidden: int):
    """normflows' multiscale Glow with flowlib's layout: level ``i`` squeezes, runs ``depth`` GlowBlocks and
    (but for the last) sends half of its channels to the prior."""
    import normflows as nf

    c, h, w = shape
    q0, flows, merges = [], [], []
    for i in range(levels):
        channels = c * 2 ** (levels + 1 - i)
        flows.append([nf.flows.GlowBlock(channels, hidden, split_mode="channel", scale=True)
                      for _ in range(depth)] + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            latent = (c * 2 ** (levels + 1), h // 2 ** levels, w // 2 ** levels)
        q0.append(nf.distributions.GlowBase(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


class FreiaGlow(torch.nn.Module):
    """A multi-scale Glow from FrEIA's modules with flowlib's layout: level ``i`` squeezes
    (``IRevNetDownsampling``), runs ``depth`` ``AllInOneBlock``s (ActNorm-like global affine, a fixed random
    orthogonal 1x1 convolution -- FrEIA has no learned LU one -- and an affine coupling with the same
    3x3 / 1x1 / 3x3 network) and, but for the last, sends half of its channels to a standard normal. Only this
    glue (the level loop and the Gaussian) is written here; the layers are FrEIA's."""

    def __init__(self, shape, levels: int, depth: int, hidden: int):
        import FrEIA.modules as Fm

        super().__init__()

        def subnet(c_in, c_out):
            net = torch.nn.Sequential(torch.nn.Conv2d(c_in, hidden, 3, padding=1), torch.nn.ReLU(),
                                      torch.nn.Conv2d(hidden, hidden, 1), torch.nn.ReLU(),
                                      torch.nn.Conv2d(hidden, c_out, 3, padding=1))
            torch.nn.init.zeros_(net[-1].weight)
            torch.nn.init.zeros_(net[-1].bias)
            return net

        dims, self.levels, self.shapes = tuple(shape), torch.nn.ModuleList(), []
        for i in range(levels):
            mods = [Fm.IRevNetDownsampling([dims])]
            dims = (dims[0] * 4, dims[1] // 2, dims[2] // 2)
            mods += [Fm.AllInOneBlock([dims], subnet_constructor=subnet, permute_soft=True)
                     for _ in range(depth)]
            self.levels.append(torch.nn.ModuleList(mods))
            if i < levels - 1:
                dims = (dims[0] // 2, dims[1], dims[2])
                self.shapes.append(dims)  # the half sent to the Gaussian
        self.shapes.append(dims)

    @staticmethod
    def _normal(z):
        return -0.5 * (z.flatten(1).square().sum(1) + z[0].numel() * math.log(2 * math.pi))

    def log_prob(self, x):
        h, logdet, total = x, 0.0, 0.0
        for i, mods in enumerate(self.levels):
            for m in mods:
                (h,), jac = m([h])
                logdet = logdet + jac
            if i < len(self.levels) - 1:
                z, h = h.chunk(2, dim=1)
                total = total + self._normal(z)
        return total + self._normal(h) + logdet

    def sample(self, n: int, temperature: float = 1.0):
        zs = [temperature * torch.randn(n, *s) for s in self.shapes]
        h = zs[-1]
        for i in range(len(self.levels) - 1, -1, -1):
            if i < len(self.levels) - 1:
                h = torch.cat([zs[i], h], dim=1)
            for m in reversed(self.levels[i]):
                (h,), _ = m([h], rev=True, jac=False)
        return h


def free_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bench(name: str, batch: int, repeats: int, optimizer: str = "adam") -> list[dict]:
    shape, levels, depth, hidden = CASES[name]
    torch.manual_seed(0)
    models = {"flowlib": Glow(shape, levels=levels, depth=depth, hidden=hidden),
              "normflows": normflows_glow(shape, levels, depth, hidden)}
    if importlib.util.find_spec("FrEIA") is not None:
        models["FrEIA"] = FreiaGlow(shape, levels, depth, hidden)
    x = torch.rand(batch, *shape) - 0.5
    log_prob = {"flowlib": lambda m: m.log_prob(x), "normflows": lambda m: m.log_prob(x, None),
                "FrEIA": lambda m: m.log_prob(x)}
    sample = {"flowlib": lambda m: m.sample(batch, temperature=0.7),
              "normflows": lambda m: m.sample(batch, temperature=0.7)[0],
              "FrEIA": lambda m: m.sample(batch, temperature=0.7)}
    for k, m in models.items():  # data-dependent ActNorm initialisation, then a finite check
        m.train()
        with torch.no_grad():
            lp = log_prob[k](m)
        if lp.shape != (batch,) or not torch.isfinite(lp).all():
            raise AssertionError(f"{k}: log_prob not finite on {name}")
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4, **OPTIMIZERS[optimizer]) for k, m in models.items()}

    def train(k):
        def step():
            loss = -log_prob[k](models[k]).mean()
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
        return step

    def draw(k):
        def run():
            models[k].eval()
            with torch.no_grad():
                sample[k](models[k])
            models[k].train()
        return run

    rows = []
    for op, make in (("train step", train), ("sample", draw)):
        times = interleaved({k: make(k) for k in models}, repeats)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rows.append({"case": name, "op": op, "batch": batch, "flowlib_ms": med["flowlib"],
                     "normflows_ms": med["normflows"], "ratio": med["flowlib"] / med["normflows"],
                     "flowlib_params": free_parameters(models["flowlib"]),
                     "normflows_params": free_parameters(models["normflows"])})
        r = rows[-1]
        line = (f"{name:<26} {op:<11} {r['flowlib_ms']:>9.1f} {r['normflows_ms']:>11.1f} {r['ratio']:>6.2f}")
        params = f"params {r['flowlib_params'] / 1e3:.1f}K / {r['normflows_params'] / 1e3:.1f}K"
        if "FrEIA" in med:
            r.update(freia_ms=med["FrEIA"], ratio_freia=med["flowlib"] / med["FrEIA"],
                     freia_params=free_parameters(models["FrEIA"]))
            line += f" {r['freia_ms']:>9.1f} {r['ratio_freia']:>6.2f}"
            params += f" / {r['freia_params'] / 1e3:.1f}K"
        print(f"{line}   {params}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS),
                        help="every library's Adam: torch's defaults, adam-foreach (what flowlib.train "
                             "uses) or adam-fused")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    freia = importlib.util.find_spec("FrEIA") is not None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; "
          f"optimizer {args.optimizer}; medians (ms), ratio = flowlib / peer"
          + ("" if freia else "; FrEIA not installed, skipped"))
    print(f"{'case':<26} {'op':<11} {'flowlib':>9} {'normflows':>11} {'ratio':>6}"
          + (f" {'FrEIA':>9} {'ratio':>6}" if freia else ""))
    rows = [r for name in args.cases for r in bench(name, args.batch, args.repeats, args.optimizer)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
                       "optimizer": args.optimizer,
                       "cpu_count": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
