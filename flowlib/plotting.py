"""Figures and tables for the notebooks: sample grids, temperature sweeps, interpolation strips (Eq. 16),
training curves, 2-D densities of toy data, gap-closure bars, results tables in the paper's layout
(Tables 1, 2, 4, 6), and the fast-mode banner every notebook shows.

Every plot function returns its :class:`matplotlib.figure.Figure` (made with pyplot, so Jupyter shows
it; close it with ``plt.close(fig)`` in loops) and, given ``path``, saves it atomically (temporary file
+ ``os.replace``). Every figure has a title and axis labels with units. Figures use constrained layout,
titles and axis labels longer than the figure are wrapped onto several lines, and :func:`save_figure`
saves with ``bbox_inches="tight"``: no text is clipped, on screen or on disk.

Images can be given in three conventions (``space``): ``"model"`` (GLOW model space, ``y = x - 0.5``
in [-0.5, 0.5); shown as ``clamp(y + 0.5, 0, 1)``), ``"unit"`` (floats in [0, 1]) or ``"pixels"``
(uint8 or floats in [0, 255]).
"""

from __future__ import annotations

import html
import math
import os
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from .metrics import format_cell
from .results import atomic_write

__all__ = [
    "FAST_MODE_TEXT",
    "PAPER_ROW_ORDER",
    "fast_mode_banner",
    "fit_text",
    "gap_closures",
    "image_grid",
    "plot_density_2d",
    "plot_gap_closure",
    "plot_interpolation",
    "plot_regime_map",
    "plot_sample_rows",
    "plot_samples",
    "plot_scatter_2d",
    "plot_temperature_sweep",
    "plot_training_curves",
    "results_table",
    "save_figure",
    "to_display",
]

#: Row order of the paper's tables (Tables 1, 4 and 6); other model names follow in order of appearance.
PAPER_ROW_ORDER = ("Student", "LKD Student", "ILKD Student", "SKD Student", "Teacher")


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Save ``fig`` atomically (:func:`flowlib.results.atomic_write`); the format follows the suffix."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight"))


def _subplots(*args, **kwargs):
    """``plt.subplots`` with constrained layout (room for tick labels, colour bars and outside legends)."""
    return plt.subplots(*args, layout="constrained", **kwargs)


def _out_of_figure(box, figure_box, slack: float = 0.5) -> bool:
    return (box.x0 < figure_box.x0 - slack or box.x1 > figure_box.x1 + slack
            or box.y0 < figure_box.y0 - slack or box.y1 > figure_box.y1 + slack)


def fit_text(fig: Figure, rounds: int = 4) -> Figure:
    """Wrap every axes title and axis label that reaches past the figure's edge onto several lines.

    Constrained layout makes room *beside* the axes, but a y-label taller than the figure (or a title wider
    than it) still runs off the edge; this rewraps such a text at the width that fits, measured after the
    layout has run, and repeats until nothing sticks out (or ``rounds`` passes)."""
    for _ in range(rounds):
        fig.draw_without_rendering()  # runs the layout engine; text extents are final afterwards
        changed = False
        for ax in fig.axes:
            for text, vertical in ((ax.title, False), (ax.xaxis.label, False), (ax.yaxis.label, True)):
                words = text.get_text()
                if not words or not text.get_visible():
                    continue
                box = text.get_window_extent()
                if not _out_of_figure(box, fig.bbox):
                    continue
                lo, hi = (fig.bbox.y0, fig.bbox.y1) if vertical else (fig.bbox.x0, fig.bbox.x1)
                centre = (box.y0 + box.y1) / 2 if vertical else (box.x0 + box.x1) / 2
                room = 0.95 * 2 * max(min(centre - lo, hi - centre), 1.0)
                length = box.height if vertical else box.width
                longest = max(len(line) for line in words.split("\n"))
                width = max(6, min(longest - 1, int(longest * room / length)))
                wrapped = textwrap.fill(" ".join(words.split()), width)
                if wrapped != words:
                    text.set_text(wrapped)
                    changed = True
        if not changed:
            break
    return fig


def _finish(fig: Figure, path) -> Figure:
    fit_text(fig)
    if path is not None:
        save_figure(fig, path)
    return fig


def to_display(images: torch.Tensor, space: str = "model") -> torch.Tensor:
    """Images (N, C, H, W) in the given convention -> float32 in [0, 1] for display."""
    if not torch.is_tensor(images):
        images = torch.as_tensor(np.asarray(images))
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C in {{1, 3}}, got {tuple(images.shape)}")
    x = images.detach().cpu().to(torch.float32)
    if space == "model":
        x = x + 0.5
    elif space == "pixels":
        x = x / 255.0
    elif space != "unit":
        raise ValueError(f"unknown image convention {space!r}; choose 'model', 'unit' or 'pixels'")
    return x.clamp(0.0, 1.0)


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0,
               space: str = "model") -> np.ndarray:
    """Arrange images in a grid with :func:`torchvision.utils.make_grid`: (H', W', 3) floats in [0, 1].

    Image ``k`` sits at row ``k // nrow``, column ``k % nrow``, at offset ``padding + (size + padding) *
    index`` along each axis; grey images are repeated to RGB.
    """
    grid = make_grid(to_display(images, space), nrow=nrow, padding=padding, pad_value=pad_value)
    return grid.permute(1, 2, 0).numpy()


def _show_grid(ax, grid: np.ndarray) -> None:
    ax.imshow(grid, interpolation="nearest", vmin=0.0, vmax=1.0)
    ax.grid(False)  # seaborn styles draw grid lines over images otherwise


def plot_samples(images: torch.Tensor, nrow: int = 8, title: str = "Samples", space: str = "model",
                 padding: int = 2, path=None, figsize: tuple[float, float] | None = None) -> Figure:
    """A grid of images (e.g. model samples; Figures 2 and 3 of the paper)."""
    grid = image_grid(images, nrow=nrow, padding=padding, space=space)
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / nrow)
    fig, ax = _subplots(figsize=figsize or (max(3.0, 0.6 * ncol + 1), max(2.5, 0.6 * nrows + 1)))
    _show_grid(ax, grid)
    ax.set_title(title)
    ax.set_xlabel(f"sample (column), {w} px wide each")
    ax.set_ylabel(f"sample (row), {h} px high each")
    ax.set_xticks([])
    ax.set_yticks([])
    return _finish(fig, path)


def _tick_centres(count: int, size: int, padding: int) -> list[float]:
    return [padding + i * (size + padding) + (size - 1) / 2 for i in range(count)]


def plot_sample_rows(samples: Mapping[str, torch.Tensor], title: str = "Samples",
                     ylabel: str = "model", space: str = "model", padding: int = 2, path=None) -> Figure:
    """Labelled rows of images with the same number of samples each (e.g. teacher / distilled student /
    plain student decoding the same noise, the paper's Figures 2 and 3)."""
    if not samples:
        raise ValueError("samples must map at least one row label to images")
    labels = list(samples)
    rows = [samples[k] for k in labels]
    ncol = rows[0].shape[0]
    if any(r.shape != rows[0].shape for r in rows):
        raise ValueError("every row needs the same number and shape of samples")
    grid = image_grid(torch.cat(rows), nrow=ncol, padding=padding, space=space)
    h, w = rows[0].shape[2:]
    fig, ax = _subplots(figsize=(max(3.0, 0.6 * ncol + 1.5), max(2.5, 0.6 * len(labels) + 1)))
    _show_grid(ax, grid)
    ax.set_title(title)
    ax.set_yticks(_tick_centres(len(labels), h, padding), labels)
    ax.set_xticks([])
    ax.set_ylabel(ylabel)
    ax.set_xlabel(f"sample ({w}x{h} px each; same noise in every row)")
    return _finish(fig, path)


def plot_temperature_sweep(samples: Mapping[float, torch.Tensor], title: str = "Samples by temperature",
                           space: str = "model", padding: int = 2, path=None) -> Figure:
    """Rows = temperatures (e.g. 0.5 / 0.7 / 1.0, from :func:`flowlib.interpolate.sample_at_temperatures`),
    columns = samples decoded from the same noise."""
    if not samples:
        raise ValueError("samples must map at least one temperature to images")
    return plot_sample_rows({f"T = {t:g}": v for t, v in samples.items()}, title=title,
                            ylabel="temperature T (noise scale, unitless)", space=space, padding=padding,
                            path=path)


def plot_interpolation(strips: torch.Tensor, alphas: Sequence[float],
                       title: str = "Latent interpolation (Eq. 16)", space: str = "model", padding: int = 2,
                       path=None) -> Figure:
    """Interpolation strips from :func:`flowlib.interpolate.interpolate_images`: (N, A, C, H, W) (or
    (A, C, H, W) for one pair); rows = pairs, columns = the A values of alpha."""
    if strips.dim() == 4:
        strips = strips.unsqueeze(0)
    if strips.dim() != 5:
        raise ValueError(f"strips must have shape (N, A, C, H, W), got {tuple(strips.shape)}")
    n, a = strips.shape[:2]
    alphas = [float(x) for x in alphas]
    if len(alphas) != a:
        raise ValueError(f"got {len(alphas)} alphas for {a} columns")
    grid = image_grid(strips.reshape(n * a, *strips.shape[2:]), nrow=a, padding=padding, space=space)
    h, w = strips.shape[3:]
    fig, ax = _subplots(figsize=(max(3.0, 0.6 * a + 1.5), max(2.0, 0.6 * n + 1.2)))
    _show_grid(ax, grid)
    ax.set_title(title)
    ax.set_xticks(_tick_centres(a, w, padding), [f"{x:.2f}" for x in alphas])
    ax.set_yticks(_tick_centres(n, h, padding), [str(i) for i in range(n)])
    ax.set_xlabel("interpolation weight α (unitless; 0 = first image, 1 = second)")
    ax.set_ylabel(f"image pair ({w}x{h} px each)")
    return _finish(fig, path)


def plot_training_curves(history: Sequence[Mapping[str, float]], keys: Iterable[str] | None = None,
                         x: str = "step", title: str = "Training curves", ylabel: str = "loss (nats)",
                         xlabel: str | None = None, logy: bool = False, path=None) -> Figure:
    """One line per metric of a training history (a list of dicts such as ``{"step": 10, "loss": 1.2,
    "val_nll": 1.3}``); records lacking a metric (e.g. validation every k steps) are skipped for it."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    if keys is None:
        seen: dict[str, None] = {}
        for rec in history:
            for k, v in rec.items():
                numeric = isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                if k != x and numeric:
                    seen.setdefault(k)
        keys = list(seen)
    keys = list(keys)
    if not keys:
        raise ValueError(f"history has no numeric metrics besides {x!r}")
    fig, ax = _subplots(figsize=(6, 4))
    for k in keys:
        pts = [(rec[x], rec[k]) for rec in history
               if k in rec and x in rec and rec[k] is not None and not _is_nan(rec[k])]
        if not pts:
            raise KeyError(f"metric {k!r} does not appear in the history")
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=k, marker="o" if len(pts) < 30 else None, markersize=3)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    if xlabel is None:
        xlabel = "step (optimizer updates)" if x == "step" else x
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def _is_nan(value) -> bool:
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _as_2d(points, name: str) -> np.ndarray:
    arr = points.detach().cpu().numpy() if torch.is_tensor(points) else np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), got {arr.shape}")
    return arr


def plot_scatter_2d(data, samples=None, title: str = "Data and model samples", labels=("data", "model"),
                    max_points: int = 2000, xlabel: str = "x₁ (data units)", ylabel: str = "x₂ (data units)",
                    path=None) -> Figure:
    """Scatter of 2-D toy data (and model samples beside it), at most ``max_points`` of each (first ones)."""
    sets = [_as_2d(data, "data")[:max_points]]
    if samples is not None:
        sets.append(_as_2d(samples, "samples")[:max_points])
    fig, ax = _subplots(figsize=(5, 5))
    for pts, label, colour in zip(sets, labels, sns.color_palette(n_colors=2)):
        sns.scatterplot(x=pts[:, 0], y=pts[:, 1], ax=ax, s=6, alpha=0.5, color=colour, label=label,
                        edgecolor=None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_aspect("equal", adjustable="datalim")
    return _finish(fig, path)


def plot_density_2d(log_prob: Callable[[torch.Tensor], torch.Tensor] | torch.nn.Module,
                    xlim=(-4.0, 4.0), ylim=(-4.0, 4.0), grid_size: int = 200, data=None,
                    title: str = "Model density", xlabel: str = "x₁ (data units)",
                    ylabel: str = "x₂ (data units)", path=None) -> Figure:
    """Heat map of ``p(x) = exp(log_prob(x))`` on a ``grid_size`` x ``grid_size`` grid (cell centres
    ``linspace(lo, hi, grid_size)`` per axis; image row i = ``y[i]``, column j = ``x[j]``, origin at the
    bottom). ``log_prob`` is a function of (M, 2) tensors or a model (its ``log_prob`` is used, in eval
    mode under inference mode). ``data`` (N, 2) is overlaid as dots."""
    from .metrics import eval_mode

    gx = torch.linspace(float(xlim[0]), float(xlim[1]), grid_size)
    gy = torch.linspace(float(ylim[0]), float(ylim[1]), grid_size)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    if isinstance(log_prob, torch.nn.Module):
        model = log_prob
        ref = next(model.parameters(), None)
        if ref is not None:
            pts = pts.to(device=ref.device, dtype=ref.dtype)
        with eval_mode(model), torch.inference_mode():
            logp = model.log_prob(pts)
    else:
        with torch.inference_mode():
            logp = log_prob(pts)
    dens = torch.exp(logp.detach().to("cpu", torch.float64)).reshape(grid_size, grid_size).numpy()
    fig, ax = _subplots(figsize=(5.5, 4.5))
    dx = (xlim[1] - xlim[0]) / (2 * max(grid_size - 1, 1))
    dy = (ylim[1] - ylim[0]) / (2 * max(grid_size - 1, 1))
    im = ax.imshow(dens, origin="lower", cmap="viridis", aspect="auto",
                   extent=(xlim[0] - dx, xlim[1] + dx, ylim[0] - dy, ylim[1] + dy))
    fig.colorbar(im, ax=ax, label="density p(x) (per unit area)")
    if data is not None:
        d = _as_2d(data, "data")
        ax.scatter(d[:, 0], d[:, 1], s=2, c="white", alpha=0.4)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _finish(fig, path)


def gap_closures(summary, by: Sequence[str] = ("arch", "dataset"), teacher: str = "teacher",
                 student: str = "nll") -> pd.DataFrame:
    """The gap closure of every distilled row of a summary, and whether it means anything.

    ``summary`` is :func:`flowlib.experiments.summarise`'s table (or its records): one row per ``by`` + model
    with the ``mean``, ``std`` and ``count`` over seeds; the ``teacher`` and plain ``student`` rows of each
    ``by`` group are the references. For every other row:

    * ``gap`` = teacher mean − student mean, ``gap_spread`` = teacher std + student std (seed standard
      deviations, 0 for one seed);
    * ``gap_closure`` = (mean − student mean) / ``gap`` (as ``summarise`` computes it; 1 = as good as the
      teacher), and ``closure_err`` = the row's std / ``|gap|``;
    * ``defined`` is True only if ``gap > gap_spread``: the teacher beats the plain student beyond the seed
      spread. Otherwise there is no gap to close and the ratio divides by noise (e.g. MAF teachers on patches
      that are no better than their students give "closures" of −52): :func:`plot_gap_closure` draws no bar
      for it, and tables should not quote it.

    ``setting`` joins the ``by`` values, last first, for labels ("magic / GLOW"); ``label`` is the summary's
    label or the model name.
    """
    frame = pd.DataFrame(summary).copy()
    by = list(by)
    if "label" not in frame:
        frame["label"] = frame["model"]
    frame["label"] = frame["label"].fillna(frame["model"])
    refs = frame.set_index([*by, "model"])
    out = []
    for _, r in frame[~frame.model.isin([teacher, student])].iterrows():
        key = tuple(r[b] for b in by)
        try:
            t, s = refs.loc[(*key, teacher)], refs.loc[(*key, student)]
        except KeyError:
            continue  # no references for this group: nothing to compare with
        gap = float(t["mean"] - s["mean"])
        spread = float(t["std"] + s["std"])
        closure = (float(r["mean"]) - float(s["mean"])) / gap if gap != 0 else math.nan
        out.append({**{b: r[b] for b in by}, "model": r["model"], "label": r["label"],
                    "setting": " / ".join(str(v).upper() if b == "arch" else str(v)
                                          for b, v in reversed(list(zip(by, key)))),
                    "mean": float(r["mean"]), "std": float(r["std"]), "gap": gap, "gap_spread": spread,
                    "gap_closure": closure, "closure_err": float(r["std"]) / abs(gap) if gap else math.nan,
                    "defined": bool(gap > spread and math.isfinite(closure))})
    columns = [*by, "model", "label", "setting", "mean", "std", "gap", "gap_spread", "gap_closure",
               "closure_err", "defined"]
    return pd.DataFrame(out, columns=columns)


def plot_gap_closure(closures, y: str = "setting", hue: str = "label",
                     title: str = "Gap closure of distilled students",
                     xlabel: str = "gap closure: (distilled − student) / (teacher − student)",
                     ylabel: str = "", path=None, figsize: tuple[float, float] | None = None) -> Figure:
    """Horizontal bars of gap closures (:func:`gap_closures`' table): one group per ``y`` value, one bar per
    ``hue`` value, with the distilled student's seed spread (std / gap) as error bars; reference lines at 0
    (no help), 0.5 (half the gap) and 1 (as good as the teacher). Rows that are not ``defined`` (no
    teacher–student gap beyond the seed spread) get no bar, only an "n/a" mark: their ratio is not a number
    worth drawing. The legend sits outside the axes, so it hides no bar."""
    frame = pd.DataFrame(closures)
    if frame.empty:
        raise ValueError("no gap closures to plot")
    cats = list(dict.fromkeys(frame[y]))
    hues = list(dict.fromkeys(frame[hue]))
    height = 0.8 / len(hues)
    fig, ax = _subplots(figsize=figsize or (8.0, 0.25 * len(frame) + 0.2 * len(cats) + 1.5))
    colours = sns.color_palette(n_colors=max(len(hues), 1))
    undefined = False
    for j, (name, colour) in enumerate(zip(hues, colours)):
        part = frame[frame[hue] == name]
        pos = [cats.index(v) - 0.4 + height * (j + 0.5) for v in part[y]]
        ok = [bool(d) and math.isfinite(c) for d, c in zip(part["defined"], part["gap_closure"])]
        xs = [float(c) for c, k in zip(part["gap_closure"], ok) if k]
        spread = part["closure_err"] if "closure_err" in part else [0.0] * len(part)
        errs = [float(e) if math.isfinite(e) else 0.0 for e, k in zip(spread, ok) if k]
        ax.barh([p for p, k in zip(pos, ok) if k], xs, height=0.9 * height, xerr=errs or None, color=colour,
                label=str(name), error_kw={"lw": 0.8, "capsize": 2})
        for p, k in zip(pos, ok):
            if not k:
                undefined = True
                ax.annotate("n/a", (0.0, p), xytext=(3, 0), textcoords="offset points", va="center",
                            ha="left", fontsize=7, color="0.35")
    ax.axvline(0.0, color="black", lw=0.8)
    ax.axvline(0.5, color="tab:red", ls="--", lw=1, label="half the gap")
    ax.axvline(1.0, color="tab:green", ls=":", lw=1, label="as good as the teacher")
    ax.set_yticks(range(len(cats)), [str(c) for c in cats])
    ax.set_ylim(len(cats) - 0.5, -0.5)  # first group on top
    ax.grid(axis="y", visible=False)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    handles, labels = ax.get_legend_handles_labels()
    if undefined:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls="none"))
        labels.append("n/a: no teacher–student gap\nbeyond the seed spread")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    return _finish(fig, path)


def plot_regime_map(cells, title: str = "When does distillation help? Gap closure by student capacity "
                    "and training-set size", path=None) -> Figure:
    """The regime map: one heat map per (architecture, method) of :func:`flowlib.study.cell_table`'s records,
    student capacity down, training fraction across. Each cell is coloured by its gap closure (clipped to
    [-1, 1]; 0 = no help, 1 = as good as the teacher) and annotated with the closure, its 95% interval and
    the number of paired seeds; a cell whose interval excludes zero is outlined (black: helps, red: hurts).
    A cell without a teacher–student gap shows the paired difference in nats instead and stays grey."""
    frame = pd.DataFrame(cells)
    if frame.empty:
        raise ValueError("no regime-map cells to plot")
    panels = list(dict.fromkeys(zip(frame["arch"], frame["method"])))
    fig, axes = _subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.2, 3.8), squeeze=False)
    cmap = plt.get_cmap("RdBu")
    for ax, (arch, method) in zip(axes[0], panels):
        part = frame[(frame.arch == arch) & (frame.method == method)]
        caps = list(dict.fromkeys(part["capacity"]))
        fracs = sorted(dict.fromkeys(part["fraction"]))
        grid = np.full((len(caps), len(fracs)), np.nan)
        for _, c in part.iterrows():
            i, j = caps.index(c["capacity"]), fracs.index(c["fraction"])
            closure = c["closure"]
            value = np.nan if closure is None or _is_nan(closure) else float(np.clip(closure, -1, 1))
            grid[i, j] = value
            if np.isnan(value):
                text = f"no gap\nΔ {c['diff']:+.3f} nats\nn={c['n']}"
            else:
                low, high = c["closure_low"], c["closure_high"]
                ci = "" if low is None or _is_nan(low) else f"\n[{low:.2f}, {high:.2f}]"
                text = f"{closure:.2f}{ci}\nn={c['n']}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7.5,
                    color="white" if not np.isnan(value) and abs(value) > 0.6 else "black")
            if c["helps"] or c["hurts"]:
                ax.add_patch(plt.Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, lw=2,
                                           edgecolor="black" if c["helps"] else "tab:red"))
        shown = np.ma.masked_invalid(grid)
        image = ax.imshow(shown, cmap=cmap, vmin=-1, vmax=1, aspect="auto")
        ax.set_facecolor("0.85")
        ax.set_xticks(range(len(fracs)), [f"{round(100 * f)}%" for f in fracs])
        ax.set_yticks(range(len(caps)), caps)
        ax.grid(False)
        ax.set(title=f"{arch.upper()} · {method.upper()}", xlabel="training rows used",
               ylabel="student capacity")
    fig.colorbar(image, ax=list(axes[0]), label="gap closure\n(outlined: 95% CI excludes 0)", shrink=0.9)
    fig.suptitle(title)
    return _finish(fig, path)


#: The text of :func:`fast_mode_banner`.
FAST_MODE_TEXT = ("FAST MODE: tiny models and few steps; numbers and figures below are not meaningful "
                  "results.")


class _Banner:
    """A warning box in Jupyter (HTML) with a plain-text form for consoles and executed-notebook text."""

    def __init__(self, text: str, detail: str):
        self.text, self.detail = text, detail

    def _repr_html_(self) -> str:
        return ('<div style="border: 2px solid #c0392b; background: #fdecea; color: #7b241c; '
                'padding: 0.6em 1em; margin: 0.4em 0; border-radius: 4px; font-size: 1.05em;">'
                f"<b>⚠ {html.escape(self.text)}</b><br><span style=\"font-size: 0.9em\">"
                f"{html.escape(self.detail)}</span></div>")

    def __repr__(self) -> str:
        return f"⚠ {self.text}\n  {self.detail}"


def fast_mode_banner(fast: bool) -> None:
    """Show a warning box, when ``fast`` is true, saying that the notebook's numbers are not results.

    Every notebook calls it right below its parameters cell: the stored defaults are fast mode (seconds
    instead of tens of minutes; results go to ``results/fast``), and a reader must not take the numbers of
    a tiny model trained for a few steps for the reproduction's. Nothing is shown at full scale."""
    if not fast:
        return None
    banner = _Banner(FAST_MODE_TEXT,
                     "Full scale: python -m flowlib.run -f configs/cpu.yaml --jobs 2 --threads 1 (writes "
                     "results/; see the README), or set fast = False, results_dir = \"results\" and "
                     "checkpoint_dir = \"checkpoints\" in the parameters cell. The committed full-scale "
                     "numbers are in results/*.json and results/REPORT.md.")
    from IPython.display import display

    display(banner)
    return None


def _cell(value, digits: int) -> str:
    if isinstance(value, str):
        return value
    return format_cell(value, digits)


def results_table(rows, columns: Sequence[str] | None = None,
                  row_order: Sequence[str] = PAPER_ROW_ORDER, digits: int = 3) -> pd.DataFrame:
    """A results table in the paper's layout: rows = models, columns = datasets, cells
    ``"mean ± std (n=k)"`` over seeds (:func:`flowlib.metrics.format_cell`), ``"-"`` where missing.

    ``rows`` is either ``{model: {dataset: values}}`` (values: per-seed list, one number, ``None`` or a
    ready string) or a list of records ``{"model", "dataset", "value"[, "arch"]}``, one per run (values
    of equal keys are pooled as seeds). With ``"arch"`` the index is (arch, model), as in Table 1.
    Models follow ``row_order`` (Student, LKD/ILKD/SKD Student, Teacher), others after them.
    """
    cells: dict[tuple, dict[str, object]] = {}
    if isinstance(rows, Mapping):
        for model, per_ds in rows.items():
            if not isinstance(per_ds, Mapping):
                raise TypeError(f"rows[{model!r}] must map dataset names to values")
            cells[(model,)] = dict(per_ds)
        has_arch = False
    else:
        records = list(rows)
        has_arch = any("arch" in r for r in records)
        for r in records:
            missing = {"model", "dataset", "value"} - set(r)
            if missing:
                raise KeyError(f"record {r} lacks {sorted(missing)}")
            key = (r.get("arch", ""), r["model"]) if has_arch else (r["model"],)
            cells.setdefault(key, {}).setdefault(r["dataset"], []).append(r["value"])
    if columns is None:
        columns = list(dict.fromkeys(ds for per in cells.values() for ds in per))
    rank = {name: i for i, name in enumerate(row_order)}
    first_seen = {k: i for i, k in enumerate(cells)}
    archs = {a: i for i, a in enumerate(dict.fromkeys(k[0] for k in cells))} if has_arch else {}
    keys = sorted(cells, key=lambda k: (archs.get(k[0], 0) if has_arch else 0,
                                        rank.get(k[-1], len(rank)), first_seen[k]))
    data = [[_cell(cells[k].get(ds), digits) for ds in columns] for k in keys]
    index = pd.MultiIndex.from_tuples(keys, names=["arch", "model"]) if has_arch else \
        pd.Index([k[0] for k in keys], name="model")
    return pd.DataFrame(data, index=index, columns=list(columns))
