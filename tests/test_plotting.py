"""Plots and tables: assert on what was drawn (pixels, lines, labels, cell text)."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from flowlib import plotting  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _images(n=5, c=1, h=4, w=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) - 0.5  # model space


def _labels(fig):
    ax = fig.axes[0]
    return ax.get_title(), ax.get_xlabel(), ax.get_ylabel()


def test_image_grid_places_each_image():
    imgs = _images()
    grid = plotting.image_grid(imgs, nrow=3, padding=1, pad_value=1.0)
    h, w = 4, 3
    assert grid.shape == (1 + 2 * (h + 1), 1 + 3 * (w + 1), 3)
    for k in range(5):
        r, c = divmod(k, 3)
        block = grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w]
        expected = (imgs[k, 0] + 0.5).clamp(0, 1).numpy()
        for ch in range(3):  # grey repeated to RGB
            np.testing.assert_allclose(block[:, :, ch], expected, atol=1e-7)
    empty = grid[1 + (h + 1): 1 + (h + 1) + h, 1 + 2 * (w + 1): 1 + 2 * (w + 1) + w]
    assert np.all(empty == 1.0)  # the missing 6th image is padding


def test_to_display_conventions():
    px = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1)
    assert torch.allclose(plotting.to_display(px, "pixels").flatten(), torch.tensor([0.0, 0.2, 1.0]))
    y = torch.tensor([-0.7, 0.0, 0.3]).view(3, 1, 1, 1)
    assert torch.allclose(plotting.to_display(y).flatten(), torch.tensor([0.0, 0.5, 0.8]))
    with pytest.raises(ValueError, match="convention"):
        plotting.to_display(y, "bogus")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        plotting.to_display(torch.zeros(2, 5, 3, 3))


def test_plot_samples_draws_the_grid_and_saves_atomically(tmp_path):
    imgs = _images(6, c=3, h=5, w=5)
    path = tmp_path / "figs" / "samples.png"
    fig = plotting.plot_samples(imgs, nrow=3, title="Teacher samples (T=0.7)", path=path)
    shown = fig.axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(np.asarray(shown), plotting.image_grid(imgs, nrow=3), atol=1e-7)
    title, xl, yl = _labels(fig)
    assert title == "Teacher samples (T=0.7)" and "px" in xl and "px" in yl
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["samples.png"]  # no temporary files left


def test_plot_temperature_sweep_rows_are_temperatures():
    samples = {0.5: _images(4, seed=1), 0.7: _images(4, seed=2), 1.0: _images(4, seed=3)}
    fig = plotting.plot_temperature_sweep(samples, padding=2)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["T = 0.5", "T = 0.7", "T = 1"]
    shown = np.asarray(ax.get_images()[0].get_array())
    h, w = 4, 3
    for r, t in enumerate(samples):
        for c in range(4):
            block = shown[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w, 0]
            np.testing.assert_allclose(block, (samples[t][c, 0] + 0.5).clamp(0, 1).numpy(), atol=1e-7)
    # tick positions sit at the row centres
    assert np.allclose(ax.get_yticks(), [2 + r * 6 + 1.5 for r in range(3)])
    assert ax.get_title() and "temperature" in ax.get_ylabel() and ax.get_xlabel()


def test_plot_interpolation_columns_are_alphas():
    strips = torch.stack([_images(4, seed=s) for s in range(2)])  # (2 pairs, 4 alphas, 1, 4, 3)
    alphas = [0.0, 1 / 3, 2 / 3, 1.0]
    fig = plotting.plot_interpolation(strips, alphas)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.00", "0.33", "0.67", "1.00"]
    np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()),
                               plotting.image_grid(strips.reshape(8, 1, 4, 3), nrow=4), atol=1e-7)
    assert "Eq. 16" in ax.get_title() and "α" in ax.get_xlabel() and "pair" in ax.get_ylabel()
    with pytest.raises(ValueError, match="alphas"):
        plotting.plot_interpolation(strips, [0.0, 1.0])


def test_plot_training_curves_lines_follow_history():
    history = [{"step": 0, "loss": 3.0}, {"step": 10, "loss": 2.0, "val_nll": 2.5},
               {"step": 20, "loss": 1.5}, {"step": 30, "loss": 1.2, "val_nll": 1.9}]
    fig = plotting.plot_training_curves(history, title="Teacher training", ylabel="NLL (nats)")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"loss", "val_nll"}
    np.testing.assert_array_equal(lines["loss"].get_xdata(), [0, 10, 20, 30])
    np.testing.assert_array_equal(lines["loss"].get_ydata(), [3.0, 2.0, 1.5, 1.2])
    np.testing.assert_array_equal(lines["val_nll"].get_xdata(), [10, 30])
    np.testing.assert_array_equal(lines["val_nll"].get_ydata(), [2.5, 1.9])
    assert _labels(fig) == ("Teacher training", "step (optimizer updates)", "NLL (nats)")
    with pytest.raises(KeyError, match="missing"):
        plotting.plot_training_curves(history, keys=["missing"])


def test_plot_scatter_2d_draws_the_points():
    g = torch.Generator().manual_seed(4)
    data, samples = torch.randn(50, 2, generator=g), torch.randn(30, 2, generator=g)
    fig = plotting.plot_scatter_2d(data, samples, max_points=40)
    cols = fig.axes[0].collections
    np.testing.assert_allclose(cols[0].get_offsets(), data[:40].numpy(), rtol=1e-6)
    np.testing.assert_allclose(cols[1].get_offsets(), samples.numpy(), rtol=1e-6)
    title, xl, yl = _labels(fig)
    assert title and "x₁" in xl and "x₂" in yl
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plotting.plot_scatter_2d(torch.zeros(5, 3))


def test_plot_density_2d_shows_exp_log_prob_on_the_grid():
    # Gaussian centred at (1, 0): the maximum must be at column x = 1, row y = 0
    def log_prob(p):
        return -0.5 * ((p[:, 0] - 1) ** 2 + p[:, 1] ** 2) - math.log(2 * math.pi)

    fig = plotting.plot_density_2d(log_prob, xlim=(-2, 2), ylim=(-2, 2), grid_size=5)
    ax = fig.axes[0]
    img = np.asarray(ax.get_images()[0].get_array())
    assert img.shape == (5, 5)
    xs = ys = np.linspace(-2, 2, 5)
    expected = np.exp(-0.5 * ((xs[None, :] - 1) ** 2 + ys[:, None] ** 2)) / (2 * np.pi)
    np.testing.assert_allclose(img, expected, rtol=1e-6)
    assert np.unravel_index(img.argmax(), img.shape) == (2, 3) and img.max() == pytest.approx(1 / (2 * np.pi))
    assert "density" in fig.axes[1].get_ylabel()  # colour bar
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_results_table_paper_layout_from_dicts():
    rows = {
        "Teacher": {"POWER": [0.133, 0.135], "GAS": [5.887]},
        "Student": {"POWER": [-0.152, -0.150, -0.154], "GAS": None},
        "LKD Student": {"POWER": "0.149*", "GAS": [4.47, 4.48]},
    }
    df = plotting.results_table(rows, digits=3)
    assert list(df.index) == ["Student", "LKD Student", "Teacher"] and list(df.columns) == ["POWER", "GAS"]
    assert df.loc["Student", "POWER"] == "-0.152 ± 0.002 (n=3)"
    assert df.loc["Student", "GAS"] == "-"
    assert df.loc["LKD Student", "POWER"] == "0.149*"
    assert df.loc["LKD Student", "GAS"] == "4.475 ± 0.007 (n=2)"
    assert df.loc["Teacher", "GAS"] == "5.887 (n=1)"


def test_results_table_from_records_with_architectures():
    recs = [
        {"arch": "GLOW", "model": "Teacher", "dataset": "GAS", "value": 6.6},
        {"arch": "GLOW", "model": "Student", "dataset": "GAS", "value": 5.9},
        {"arch": "GLOW", "model": "Student", "dataset": "GAS", "value": 6.1},
        {"arch": "MAF", "model": "ILKD Student", "dataset": "GAS", "value": 4.5},
        {"arch": "MAF", "model": "Student", "dataset": "HEPMASS", "value": -21.9},
    ]
    df = plotting.results_table(recs, columns=["GAS", "HEPMASS"], digits=2)
    assert list(df.index) == [("GLOW", "Student"), ("GLOW", "Teacher"), ("MAF", "Student"),
                              ("MAF", "ILKD Student")]
    assert df.loc[("GLOW", "Student"), "GAS"] == "6.00 ± 0.14 (n=2)"
    assert df.loc[("MAF", "Student"), "GAS"] == "-"
    assert df.loc[("MAF", "Student"), "HEPMASS"] == "-21.90 (n=1)"
    with pytest.raises(KeyError, match="value"):
        plotting.results_table([{"model": "Student", "dataset": "GAS"}])


def test_plot_density_2d_of_a_flow_uses_eval_mode_and_restores_it():
    from flowlib.models import MAF
    from tests.flowcheck import perturb

    model = MAF(2, depth=2, hidden=8)
    model.train()
    model.log_prob(torch.randn(64, 2, generator=torch.Generator().manual_seed(5)) * 1.5)  # BN statistics
    perturb(model, 0.05)
    fig = plotting.plot_density_2d(model, xlim=(-3, 3), ylim=(-2, 2), grid_size=7)
    assert model.training
    img = np.asarray(fig.axes[0].get_images()[0].get_array())
    gy, gx = torch.meshgrid(torch.linspace(-2, 2, 7), torch.linspace(-3, 3, 7), indexing="ij")
    model.eval()
    with torch.no_grad():
        expected = model.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).exp().reshape(7, 7)
    np.testing.assert_allclose(img, expected.double().numpy(), rtol=1e-5)


def test_plot_sample_rows_labels_rows_and_hides_grid_lines():
    rows = {"teacher": torch.zeros(3, 1, 4, 4) - 0.5, "student": torch.zeros(3, 1, 4, 4) + 0.49}
    fig = plotting.plot_sample_rows(rows, title="same noise")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["teacher", "student"]
    img = ax.images[0].get_array()
    assert img[3, 3, 0] == 0.0 and abs(img[-3, 3, 0] - 0.99) < 1e-6  # first row black, second near white
    assert not any(line.get_visible() for line in ax.get_xgridlines() + ax.get_ygridlines())
    plt.close(fig)


def test_training_curves_skip_nan_between_evaluations():
    history = [{"step": s, "loss": 1.0 / s, "val_nll": (2.0 / s if s % 5 == 0 else math.nan)}
               for s in range(1, 21)]
    fig = plotting.plot_training_curves(history, keys=["loss", "val_nll"])
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines["val_nll"].get_xdata()) == [5, 10, 15, 20]
    assert len(lines["loss"].get_xdata()) == 20
    plt.close(fig)


def _summary():
    """Three settings: a clear gap (closure defined), a teacher worse than its student, and a gap smaller than
    the seed spread (both undefined)."""
    rows = []
    for setting, (teacher, student, student_std) in {"clear": (1.0, 0.0, 0.1), "worse": (0.0, 0.1, 0.05),
                                                     "noisy": (1.0, 0.9, 0.2)}.items():
        rows += [{"arch": "glow", "dataset": setting, "model": "teacher", "mean": teacher, "std": 0.0},
                 {"arch": "glow", "dataset": setting, "model": "nll", "mean": student, "std": student_std},
                 {"arch": "glow", "dataset": setting, "model": "lkd", "mean": student + 0.5, "std": 0.1},
                 {"arch": "glow", "dataset": setting, "model": "ilkd", "mean": student - 0.2, "std": 0.1}]
    return rows


def test_gap_closures_are_defined_only_beyond_the_seed_spread():
    c = plotting.gap_closures(_summary()).set_index(["dataset", "model"])
    assert c.loc[("clear", "lkd"), "gap_closure"] == pytest.approx(0.5)
    assert c.loc[("clear", "ilkd"), "gap_closure"] == pytest.approx(-0.2)
    assert c.loc[("clear", "lkd"), "closure_err"] == pytest.approx(0.1)
    assert c.loc[("clear", "lkd"), "gap_spread"] == pytest.approx(0.1)
    assert bool(c.loc[("clear", "lkd"), "defined"])
    assert not c.loc[["worse", "noisy"], "defined"].any()  # gap -0.1 and 0.1 (spread 0.2): nothing to close
    assert c.loc[("worse", "lkd"), "setting"] == "worse / GLOW"


def test_plot_gap_closure_draws_no_bar_where_the_closure_is_undefined(tmp_path):
    closures = plotting.gap_closures(_summary())
    fig = plotting.plot_gap_closure(closures, path=tmp_path / "gap.png")
    ax = fig.axes[0]
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    # only the two defined closures ("clear": 0.5 and -0.2) are bars, each at its value
    assert sorted(round(b.get_width(), 6) for b in bars) == [-0.2, 0.5]
    assert all(abs(b.get_y() + b.get_height() / 2) < 0.5 for b in bars)  # both in the first group ("clear")
    marks = [t for t in ax.texts if t.get_text() == "n/a"]
    assert len(marks) == 4  # two methods x two undefined settings, written, not drawn as numbers
    assert [t.get_text() for t in ax.get_yticklabels()] == ["clear / GLOW", "worse / GLOW", "noisy / GLOW"]
    # the legend sits outside the axes: it cannot hide a bar
    fig.canvas.draw()
    legend, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes_box.x1
    assert (tmp_path / "gap.png").exists()


def _texts_outside(fig):
    """Texts (titles, labels, legend entries, annotations) reaching past the figure's edge, and whether
    everything drawn (tick labels included) fits in the figure."""
    from matplotlib.text import Text

    fig.canvas.draw()
    box = fig.bbox
    ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for t in axis.get_ticklabels(which="both")}  # some are off-view and never drawn: see below
    out = []
    for t in fig.findobj(Text):
        if id(t) in ticks or not t.get_visible() or not t.get_text().strip():
            continue
        e = t.get_window_extent()
        if e.x0 < box.x0 - 0.5 or e.x1 > box.x1 + 0.5 or e.y0 < box.y0 - 0.5 or e.y1 > box.y1 + 0.5:
            out.append(t.get_text())
    drawn = fig.get_tightbbox()  # inches; only what is drawn
    w, h = fig.get_size_inches()
    if drawn.x0 < -0.01 or drawn.y0 < -0.01 or drawn.x1 > w + 0.01 or drawn.y1 > h + 0.01:
        out.append(f"drawn area {drawn.bounds} exceeds the figure ({w} x {h} in)")
    return out


def test_figures_keep_every_text_inside_the_figure(tmp_path):
    """No title, label or legend is clipped, even before ``bbox_inches="tight"``: e.g. notebook 04's
    two-row temperature sweep, whose y-label is taller than the figure."""
    history = [{"step": s, "loss": 3.0 / s, "val_nll": 3.5 / s} for s in range(1, 30)]
    figures = {
        "temperature sweep": plotting.plot_temperature_sweep(
            {0.7: _images(16, h=28, w=28), 1.0: _images(16, h=28, w=28, seed=1)},
            title="GLOW teacher samples on fashion-mnist (pixel intensity)", path=tmp_path / "t.png"),
        "sample rows": plotting.plot_sample_rows(
            {"Teacher": _images(12, h=28, w=28), "ILKD Student": _images(12, h=28, w=28, seed=2)},
            title="fashion-mnist: same noise, T = 0.7", path=tmp_path / "s.png"),
        "interpolation": plotting.plot_interpolation(
            torch.stack([_images(8, h=28, w=28, seed=s) for s in range(3)]), [i / 7 for i in range(8)],
            title="Teacher: norm-preserving interpolation between test images (T = 1.0)",
            path=tmp_path / "i.png"),
        "samples": plotting.plot_samples(_images(4), nrow=4,
                                         title="a long title for a small grid of samples"),
        "curves": plotting.plot_training_curves(history,
                                                title="MAF teacher on patches: NLL (nats) per step"),
        "gap closure": plotting.plot_gap_closure(
            plotting.gap_closures(_summary()), path=tmp_path / "g.png",
            title="How much of the student-teacher gap distillation closed (test log-likelihood)"),
    }
    clipped = {name: _texts_outside(fig) for name, fig in figures.items()}
    assert not any(clipped.values()), clipped
    assert "temperature" in figures["temperature sweep"].axes[0].get_ylabel()  # wrapped, not dropped


def test_fast_mode_banner_is_shown_in_fast_mode_only(capsys):
    assert plotting.fast_mode_banner(True) is None
    shown = capsys.readouterr().out  # outside Jupyter, IPython's display prints the plain-text form
    assert plotting.FAST_MODE_TEXT in shown and "configs/cpu.yaml" in shown
    plotting.fast_mode_banner(False)
    assert capsys.readouterr().out == ""
    html = plotting._Banner(plotting.FAST_MODE_TEXT, "detail")._repr_html_()
    assert plotting.FAST_MODE_TEXT in html and "border" in html
