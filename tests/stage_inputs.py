"""Tiny validated tables written the way the validate stage writes them (parquet + manifest)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import storage


def write_validated(folder: Path, ratings: pd.DataFrame, movies: pd.DataFrame,
                    tags: pd.DataFrame | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tables = {}
    frames = {"ratings": ratings, "movies": movies}
    if tags is not None:
        frames["tags"] = tags
    for name, df in frames.items():
        path = folder / f"{name}.parquet"
        df.to_parquet(path, index=False)
        tables[name] = {"rows": len(df), "path": str(path)}
    dataset = {"variant": "tiny", "ratings": len(ratings), "users": ratings.user_id.nunique(),
               "movies": len(movies), "tags": None if tags is None else len(tags)}
    storage.write_manifest(folder, "validate", tables, dataset=dataset)
    return folder


def ratings_frame(rows) -> pd.DataFrame:
    """rows of (user_id, movie_id, rating, ts)."""
    df = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "ts"])
    return df.astype({"user_id": "int64", "movie_id": "int64", "rating": "float64", "ts": "int64"})


def movies_frame(rows) -> pd.DataFrame:
    """rows of (movie_id, title, year, [genres])."""
    df = pd.DataFrame(rows, columns=["movie_id", "title", "year", "genres"])
    return df.astype({"movie_id": "int64", "year": "Int64"})


def planted_ratings(n_users: int = 80, n_movies: int = 50, rank: int = 3, observed: float = 0.4,
                    noise: float = 0.1, seed: int = 0) -> pd.DataFrame:
    """Ratings from a planted low-rank structure plus user/item biases (ids from 1, dense idx from 0)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    U = rng.normal(0, 0.6, (n_users, rank))
    V = rng.normal(0, 0.6, (n_movies, rank))
    bu = rng.normal(0, 0.3, n_users)
    bi = rng.normal(0, 0.3, n_movies)
    full = 3.5 + bu[:, None] + bi[None, :] + U @ V.T
    mask = rng.random((n_users, n_movies)) < observed
    u, m = np.nonzero(mask)
    r = np.clip(np.round((full[u, m] + rng.normal(0, noise, len(u))) * 2) / 2, 0.5, 5.0)
    return pd.DataFrame({"user_id": u + 1, "movie_id": m + 101, "rating": r, "ts": 1_000_000_000 + np.arange(len(u)),
                         "user_idx": u, "movie_idx": m}).astype({"user_id": "int64", "movie_id": "int64",
                                                                 "user_idx": "int32", "movie_idx": "int32"})


def write_split(folder: Path, ratings: pd.DataFrame, seed: int = 1) -> tuple[Path, dict]:
    """A per-user random 80/10/10 split written the way the etl stage writes it (parquet + manifest)."""
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    key = rng.random(len(ratings))
    order = ratings.assign(_k=key).sort_values(["user_id", "_k"])
    pos = order.groupby("user_id").cumcount()
    n = order.groupby("user_id")["movie_id"].transform("size")
    n_test = np.floor(n * 0.1 + 0.5)
    part = np.where(pos < n_test, "test", np.where(pos < 2 * n_test, "validation", "train"))
    frames = {name: order[part == name].drop(columns="_k").reset_index(drop=True)
              for name in ("train", "validation", "test")}
    tables = {}
    for name, df in frames.items():
        df.to_parquet(folder / f"{name}.parquet", index=False)
        tables[name] = {"rows": len(df), "path": str(folder / f"{name}.parquet")}
    split = {"strategy": "random", "seed": seed, "train": len(frames["train"]),
             "validation": len(frames["validation"]), "test": len(frames["test"]), "test_fingerprint": "tiny",
             "paths": {k: v["path"] for k, v in tables.items()}}
    storage.write_manifest(folder, "etl", tables, split=split)
    return folder, frames
