"""Figures and tables of the workbook: integer epoch / rank ticks, save_figure's display, whole tables."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from muva_core.viz.plots import SavedFigure, plot_cmc, plot_curves, save_figure, whole_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _shown_ticks(ax) -> np.ndarray:
    """The x ticks matplotlib draws (inside the view limits), after a draw."""
    ax.figure.canvas.draw()
    lo, hi = sorted(ax.get_xlim())
    ticks = np.asarray(ax.get_xticks(), dtype=float)
    return ticks[(ticks >= lo - 1e-9) & (ticks <= hi + 1e-9)]


@pytest.mark.parametrize("epochs", [1, 2, 3, 5, 12])
def test_curves_of_few_epochs_have_integer_ticks(epochs):
    history = pd.DataFrame({"epoch": np.arange(1, epochs + 1), "loss_id": np.linspace(2, 1, epochs),
                            "loss_tri": np.linspace(1, 0.5, epochs)})
    for logy in (False, True):
        fig = plot_curves(history, "epoch", ["loss_id", "loss_tri"], title="t", logy=logy)
        ticks = _shown_ticks(fig.axes[0])
        assert len(ticks) and np.all(ticks == np.round(ticks)), ticks
        plt.close(fig)


def test_curves_of_a_fractional_axis_keep_fractional_ticks():
    history = pd.DataFrame({"step": [0.25, 0.5, 0.75], "loss": [3.0, 2.0, 1.0]})
    fig = plot_curves(history, "step", ["loss"])
    assert not np.all(_shown_ticks(fig.axes[0]) == np.round(_shown_ticks(fig.axes[0])))
    plt.close(fig)


@pytest.mark.parametrize("ranks", [1, 5, 10, 20])
def test_cmc_has_integer_rank_ticks(ranks):
    cmc = np.linspace(0.3, 1.0, 50)
    fig = plot_cmc(cmc, max_rank=ranks, title="CMC on synth_B")
    ax = fig.axes[0]
    ticks = _shown_ticks(ax)
    assert len(ticks) and np.all(ticks == np.round(ticks)) and ticks.min() >= 1 and ticks.max() <= ranks, ticks
    x, y = ax.lines[0].get_data()
    assert list(x) == list(range(1, ranks + 1))
    np.testing.assert_allclose(y, 100 * cmc[:ranks])
    assert ax.get_title() == "CMC on synth_B" and ax.get_xlabel() == "rank"
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one rank"):
        plot_cmc([])


def test_save_figure_returns_the_paths_shown_as_one_line(tmp_path, monkeypatch):
    from IPython.core.formatters import DisplayFormatter

    monkeypatch.chdir(tmp_path)
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    saved = save_figure(fig, tmp_path / "run" / "figures", "06_cmc")
    plt.close(fig)
    # still the list of both paths for the callers that use them
    assert isinstance(saved, list) and isinstance(saved, SavedFigure)
    assert saved == [tmp_path / "run/figures/06_cmc.png", tmp_path / "run/figures/06_cmc.svg"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in saved)
    png, svg = saved
    assert png.suffix == ".png" and svg.suffix == ".svg"
    # what a notebook cell whose last line is save_figure(...) shows
    assert repr(saved) == str(saved) == "saved: run/figures/06_cmc.png, 06_cmc.svg"
    bundle, _ = DisplayFormatter().format(saved)
    assert bundle["text/plain"] == "saved: run/figures/06_cmc.png, 06_cmc.svg"
    assert "PosixPath" not in bundle["text/plain"] and "06_cmc.svg" in bundle["text/html"]
    # outside the working directory (and the project root): the absolute path, once
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert str(saved) == f"saved: {png.as_posix()}, 06_cmc.svg"


def _calibration_report():
    from muva_core.grounding.calibration import calibrate_boxes
    from muva_core.grounding.labelling import boxes_table
    from muva_core.grounding.simulated import SimulatedExpert

    from conftest import make_truth

    ex = SimulatedExpert(make_truth(200, seed=1), seed=3, domain="synth_A")
    table = boxes_table(ex.keys, ex.ground(None, ex.keys), [(128, 256)] * len(ex.keys), backend="synthetic")
    return calibrate_boxes(table)


def test_calibration_table_is_shown_whole():
    """The per-part replacement table (~22+ columns) is not cut by pandas' display.max_columns."""
    from IPython.core.formatters import DisplayFormatter

    _, report = _calibration_report()
    frame = report.to_frame().round(3)
    # a Jupyter kernel's pandas options (max_columns 20; a few rows, to check rows are not cut either)
    with pd.option_context("display.max_columns", 20, "display.max_rows", 10, "display.width", 80):
        assert frame.shape[1] > pd.get_option("display.max_columns")   # 22 columns: cut before
        cut = DisplayFormatter().format(frame)[0]["text/html"]
        assert "..." in cut                                            # pandas' own display truncates it
        shown = whole_table(frame, transpose=True, caption="synth_A")
        assert shown.frame.shape[0] > pd.get_option("display.max_rows")
        bundle = DisplayFormatter().format(shown)[0]
        flat = DisplayFormatter().format(whole_table(frame))[0]["text/html"]
    for text in (bundle["text/html"], bundle["text/plain"]):
        for column in frame.columns:
            assert column in text, column
        for part in frame.index:
            assert part in text
        assert "..." not in text and "…" not in text
    assert shown.frame.shape == frame.shape[::-1] and list(shown.frame.columns) == list(frame.index)
    # counts stay integers once transposed (not "200.0" rows)
    assert shown.frame.loc["rows"].map(lambda v: isinstance(v, (int, np.integer))).all()
    assert f">{int(frame['rows'].iloc[0])}<" in bundle["text/html"]
    assert "synth_A" in bundle["text/html"]
    # not transposed: every column too
    assert all(c in flat for c in frame.columns) and "..." not in flat


def _cell_sources(name: str) -> list[str]:
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebooks_use_the_helpers():
    cmc_cells = [s for s in _cell_sources("06_evaluate") if "cmc" in s.lower()]
    assert any("plot_cmc(" in s for s in cmc_cells) and not any("ax.plot(" in s for s in cmc_cells)
    calibration = [s for s in _cell_sources("02_calibration") if "to_frame()" in s]
    assert calibration and all("whole_table(" in s for s in calibration)
