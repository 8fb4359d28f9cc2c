"""The charts of the run report page (``report.html``): matplotlib figures handed back as ``data:`` URIs, so the
page carries them inline and opens without a network (docs/adr/0072-run-report-page.md)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

CHART_DPI = 100
MODEL_COLOUR = "#4c72b0"
REFERENCE_COLOUR = "#c44e52"  # the bar a model must beat: the baseline's RMSE, popularity's NDCG@10


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def file_uri(path: Path) -> str:
    """A PNG file (the olap stage's plots) as a ``data:`` URI."""
    return png_uri(Path(path).read_bytes())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_uri(fig) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=CHART_DPI)
    plt.close(fig)
    return png_uri(buffer.getvalue())


def _label_bars(ax, bars, values, digits: int) -> None:
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.{digits}f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")


def rmse_chart(rows: list[dict], reference: str = "baseline") -> str | None:
    """Validation and test RMSE per rating model (``rows``: ``model``, ``val_rmse``, ``test_rmse``), the
    ``reference`` model's test RMSE drawn across as the bar to beat. None without a figure to draw."""
    rows = [r for r in rows if r.get("test_rmse") is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r["model"] for r in rows]
    positions = range(len(rows))
    val = [r.get("val_rmse") or 0.0 for r in rows]
    test = [r["test_rmse"] for r in rows]
    width = 0.38
    ax.bar([p - width / 2 for p in positions], val, width, label="validation RMSE", color="#8da0cb")
    bars = ax.bar([p + width / 2 for p in positions], test, width, label="test RMSE",
                  color=[REFERENCE_COLOUR if n == reference else MODEL_COLOUR for n in names])
    _label_bars(ax, bars, test, 4)
    bar = next((r["test_rmse"] for r in rows if r["model"] == reference), None)
    if bar is not None:
        ax.axhline(bar, color=REFERENCE_COLOUR, ls="--", lw=1, label=f"{reference} test RMSE {bar:.4f}")
    low = min(v for v in val + test if v > 0)
    ax.set_ylim(max(0.0, low - 0.08), max(val + test) + 0.04)
    ax.set_xticks(list(positions), names)
    ax.set(ylabel="RMSE (lower is better)", title="Rating models: RMSE on validation and test")
    ax.legend(fontsize=8, loc="lower right")
    return _figure_uri(fig)


def ndcg_chart(candidates: dict[str, dict], popularity: dict | None) -> str | None:
    """Test NDCG@10 of every ranking candidate beside popularity's. None without a figure to draw."""
    rows = [(name, figures.get("test_ndcg_at_10")) for name, figures in sorted(candidates.items())]
    if popularity and popularity.get("test_ndcg_at_10") is not None:
        rows.append(("popularity", popularity["test_ndcg_at_10"]))
    rows = [(name, value) for name, value in rows if value is not None]
    if not rows:
        return None
    rows.sort(key=lambda row: row[1])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.4))
    names, values = zip(*rows)
    colours = [REFERENCE_COLOUR if n == "popularity" else MODEL_COLOUR for n in names]
    bars = ax.barh(names, values, color=colours)
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.4f}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center",
                    fontsize=8, xytext=(3, 0), textcoords="offset points")
    if popularity and popularity.get("test_ndcg_at_10") is not None:
        ax.axvline(popularity["test_ndcg_at_10"], color=REFERENCE_COLOUR, ls="--", lw=1)
    ax.set_xlim(0, (max(values) or 1.0) * 1.18)  # every figure 0: still a range
    ax.set(xlabel="test NDCG@10 (higher is better)", title="Every model as a ranker, beside popularity")
    return _figure_uri(fig)


def timings_chart(timings: dict[str, float], order: list[str]) -> str | None:
    """Seconds per stage, in pipeline order (``order``; stages not in it after). None without timings."""
    rank = {name: i for i, name in enumerate(order)}
    rows = sorted(((name, float(s)) for name, s in timings.items() if s is not None),
                  key=lambda row: (rank.get(row[0], len(rank)), row[0]))
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.2))
    names, seconds = zip(*rows)
    bars = ax.barh(names, seconds, color=MODEL_COLOUR)
    for bar, value in zip(bars, seconds):
        ax.annotate(f"{value:.1f} s", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center",
                    fontsize=8, xytext=(3, 0), textcoords="offset points")
    ax.invert_yaxis()  # the first stage on top
    ax.set_xlim(0, max(max(seconds) * 1.15, 1.0))
    ax.set(xlabel="seconds", title=f"Seconds per stage ({sum(seconds):.0f} s in all)")
    return _figure_uri(fig)
