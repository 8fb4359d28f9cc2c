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
