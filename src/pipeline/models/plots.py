"""Figures the model stages log to MLflow: the ALS grid's validation heatmap and AutoRec's learning curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def als_heatmap(results: list[dict], path: Path, title: str = "ALS validation RMSE (best over maxIter)") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(results)
    table = frame.groupby(["rank", "reg_param"])["val_rmse"].min().unstack("reg_param")
    fig, ax = plt.subplots(figsize=(1.3 * len(table.columns) + 2, 0.6 * len(table.index) + 2))
    image = ax.imshow(table.to_numpy(), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(table.columns)), [f"{c:g}" for c in table.columns])
    ax.set_yticks(range(len(table.index)), [str(r) for r in table.index])
    ax.set(xlabel="regParam", ylabel="rank", title=title)
    for (i, j), value in np.ndenumerate(table.to_numpy()):
        ax.text(j, i, f"{value:.4f}" if np.isfinite(value) else "not fitted", ha="center", va="center",
                color="white" if np.isfinite(value) else "black", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
def autorec_curves(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(history)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(frame["epoch"], frame["train_rmse"], label="training-set RMSE (observed ratings; not for decisions)")
    ax.plot(frame["epoch"], frame["val_rmse"], label="validation RMSE")
    best = frame.loc[frame["val_rmse"].idxmin()]
    ax.axvline(best["epoch"], color="grey", ls="--", lw=1)
    ax.set(xlabel="epoch", ylabel="RMSE", title=f"AutoRec (best epoch {int(best['epoch'])})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
