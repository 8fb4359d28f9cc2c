"""The item kNN's cost and accuracy against ``knn_max_user_ratings`` (the cap on each user's ratings that the
similarities are estimated from).

    .venv/bin/python bench/knn_tables.py --data /tmp/recsys-bench/data/synth-25m --caps 0,2000
    .venv/bin/python bench/knn_tables.py --run /tmp/run-folder --caps 0,2000,1000,500

``--data``: a MovieLens-CSV folder; times the neighbour-table build (``neighbour_tables``, the default two
shrinkages and K = 200) on the users x movies matrix of ratings minus their mean, once per cap, and prints the
share of ratings kept and the sum over users of their ratings squared (what the co-rating products cost).
``--run``: a run folder with the ``etl`` and ``baseline`` stages done (``recsys run --stages
ingest,validate,etl,baseline``); fits the default kNN grid on its training split once per cap and prints the
best point by validation RMSE with its validation and test RMSE. Cap 0: every rating.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline import storage
from pipeline.models.factor_model import FactorModel
from pipeline.models.metrics import rating_metrics
from pipeline.models.neighbourhood import cap_user_ratings, fit_knn_grid, neighbour_tables
from pipeline.params import Params


def squares(z: sp.csr_matrix) -> float:
    return float((np.diff(z.indptr).astype(np.float64) ** 2).sum())


def tables(folder: Path, caps: list[int]) -> None:
    started = time.perf_counter()
    r = pd.read_csv(folder / "ratings.csv", usecols=["userId", "movieId", "rating"],
                    dtype={"userId": "int64", "movieId": "int64", "rating": "float32"})
    users, rows = np.unique(r["userId"].to_numpy(), return_inverse=True)
    movies, cols = np.unique(r["movieId"].to_numpy(), return_inverse=True)
    values = (r["rating"].to_numpy() - r["rating"].mean()).astype(np.float32)
    z = sp.csr_matrix((values, (rows, cols)), shape=(len(users), len(movies)))
    del r
    p = Params()
    print(f"{folder}: {len(users)} users, {len(movies)} movies, {z.nnz} ratings, at most "
          f"{np.diff(z.indptr).max()} a user, sum of squares {squares(z):.3g} (read in "
          f"{time.perf_counter() - started:.1f} s)", flush=True)
    for cap in caps:
        capped = cap_user_ratings(z, cap, 0)
        started = time.perf_counter()
        neighbour_tables(capped, p.knn_shrinkages, max(p.knn_neighbours))
        print(f"cap {cap or 'none'}: {capped.nnz / z.nnz:.3f} of the ratings, sum of squares {squares(capped):.3g}, "
              f"tables {time.perf_counter() - started:.1f} s", flush=True)


def accuracy(run: Path, caps: list[int]) -> None:
    manifest = storage.read_manifest(run / "etl", "bench")
    train, validation, test = (pd.read_parquet(manifest["tables"][n]["path"]) for n in ("train", "validation", "test"))
    baseline = FactorModel.load(storage.read_manifest(run / "baseline", "bench")["candidate"]["model_path"]).baseline
    p = Params()
    for cap in caps:
        started, best = time.perf_counter(), None
        for point, model in fit_knn_grid(train, baseline, p.knn_neighbours, p.knn_shrinkages, p.knn_dampings,
                                         max_user_ratings=cap, seed=p.seed):
            val = rating_metrics(validation, model.predict, baseline, train, split="val")["val_rmse"]
            if best is None or val < best[0]:
                best = (val, point, model)
        val, point, model = best
        test_rmse = rating_metrics(test, model.predict, baseline, train)["test_rmse"]
        print(f"cap {cap or 'none'}: best {point}, validation RMSE {val:.4f}, test RMSE {test_rmse:.4f} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a MovieLens-CSV folder: time the neighbour tables")
    source.add_argument("--run", type=Path, help="a run folder with etl and baseline done: kNN accuracy")
    parser.add_argument("--caps", default="0,2000", help="comma-separated caps on ratings per user (0: none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    caps = [int(c) for c in args.caps.split(",")]
    tables(args.data, caps) if args.data else accuracy(args.run, caps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
