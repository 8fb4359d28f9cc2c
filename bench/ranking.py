"""Public ranking baselines on a run's own split files, beside the run's own candidates: one markdown table.

    .venv/bin/python bench/ranking.py --run-dir RUN [--json OUT.json] [--threads N] [--seed 42]
        [--ease-inputs binary,rating/5,rating>=3.5,(rating/5)^2] [--ease-lambdas 25,50,100,200,400,800]
        [--ials-factors 64,128,256] [--ials-regs 20,50,100] [--ials-alphas 5,10,20] [--ials-iters 15]
        [--rp3-alphas 0.25,0.5,0.75,1] [--rp3-betas 0.2,0.35,0.5,0.65] [--rp3-neighbours 0]
        [--knn-neighbours 50,100,200] [--blend-weights 0,0.1,...,1]

RUN is a run folder (``recsys run --work-dir RUN``) whose ``etl`` and ``baseline`` stages have completed: its
etl/manifest.json names the train/validation/test tables, its report.json the Params (the seeded sample of
ranked users, ``ranking_max_users`` and ``seed``) and the run's own ranking figures. The protocol is the
project's, through its own code: every model is fitted on the training split only, every choice (lambda, input
weighting, factors, ...) is made on validation NDCG@10, the test lists leave out training and validation movies,
relevant means rating >= 4, and the lists and metrics come from ``pipeline.models.ranking.evaluate_ranking`` (a
user a model cannot score gets the popularity list). The popularity row is computed here and checked against the
run's own figure, so the table's figures compare to the run's exactly.

The baselines: popularity; EASE (Steck 2019) on each input weighting of the training matrix (binary, rating/5,
binary of the ratings >= 3.5, (rating/5)^2), each with its best lambda by validation; implicit-feedback ALS of
the ``implicit`` library (conjugate gradient, confidence 1 + alpha * rating/5, BLAS at one thread as the library
advises) over factors x regularisation x alpha; RP3beta (Paudel et al. 2017) over alpha x beta, every target
kept unless --rp3-neighbours; item-kNN on the cosine of the binary matrix over its neighbour count; and the
blend of the best EASE and the best ALS (each user's scores min-max scaled over the catalogue, the weight chosen
on validation). Every model ranks the EASE catalogue (movies with at least the run's ``ease_min_ratings``
training ratings). Then the run's own rows (report.json ``ranking.popularity`` and ``ranking.candidates``),
marked "this project". ml-latest-small: about 1 minute on 2 cores, 1.1 GB resident. Progress goes to stderr,
the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import scipy.sparse as sp

if __name__ == "__main__":  # run as a script: bench/ is first on sys.path, where
    _BENCH = Path(__file__).resolve().parent               # bench/pipeline.py steps aside for the package
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _BENCH]

EASE_INPUTS = {  # name -> the training matrix's value for a rating
    "binary": lambda r: np.ones_like(r),
    "rating/5": lambda r: r / 5.0,
    "rating>=3.5": lambda r: (r >= 3.5).astype(np.float64),
    "(rating/5)^2": lambda r: (r / 5.0) ** 2,
}
COLUMNS = ("val_ndcg_at_10", "test_ndcg_at_10", "test_precision_at_10", "test_recall_at_10")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# --- the run's split ------------------------------------------------------------------------------------------


def load_run(run_dir: Path):
    """(split, report): the run's persisted split as ``protocol.Split`` (with the run's ranking sample) and its
    report.json ({} when the run wrote none yet)."""
    from pipeline.models.protocol import load_split
    from pipeline.params import Params

    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    defaults, given = Params(), report.get("params", {})
    params = SimpleNamespace(**{name: given.get(name, getattr(defaults, name))
                                for name in ("ranking_max_users", "seed", "ease_min_ratings")})
    ctx = SimpleNamespace(stage_dir=lambda stage: run_dir / stage, params=params)
    return load_split(ctx, "bench/ranking.py"), report, params


class Matrix:
    """The training split as a users x movies CSR matrix of ratings; ``catalogue``: the columns every model
    ranks (movies with at least ``min_ratings`` training ratings)."""

    def __init__(self, train: pd.DataFrame, min_ratings: int):
        self.users = pd.Index(np.unique(train["user_id"].to_numpy(np.int64)))
        self.movies = pd.Index(np.unique(train["movie_id"].to_numpy(np.int64)))
        rows = self.users.get_indexer(train["user_id"].to_numpy(np.int64))
        cols = self.movies.get_indexer(train["movie_id"].to_numpy(np.int64))
        self.ratings = sp.csr_matrix((train["rating"].to_numpy(np.float64), (rows, cols)),
                                     shape=(len(self.users), len(self.movies)))
        counts = np.diff(self.ratings.tocsc().indptr)
        self.catalogue = np.flatnonzero(counts >= min_ratings)
        self.cat_ratings = self.ratings[:, self.catalogue].tocsr()
        self.known = np.diff(self.cat_ratings.indptr) > 0  # users with a catalogue movie in their history

    def weighted(self, weight, catalogue: bool = True) -> sp.csr_matrix:
        m = (self.cat_ratings if catalogue else self.ratings).copy()
        m.data = weight(m.data).astype(np.float32)
        m.eliminate_zeros()
        return m


class Ranker:
    """A ranker for ``evaluate_ranking``: ``scores(rows)`` gives the dense scores of those matrix rows over the
    catalogue; users outside the training matrix, or without a catalogue movie, are left to popularity."""

    def __init__(self, matrix: Matrix, scores):
        self.matrix, self.scores = matrix, scores
        self.movie_ids = matrix.movies.to_numpy()[matrix.catalogue]

    def top_k(self, user_ids, k: int, exclude=None, history=None) -> dict:
        from pipeline.models.ranking import top_k_by_score

        users = np.asarray([int(u) for u in user_ids], dtype=np.int64)
        pos = self.matrix.users.get_indexer(users)
        ok = pos >= 0
        ok[ok] = self.matrix.known[pos[ok]]
        rows = self.matrix.users

        def score(chunk):
            return self.scores(rows.get_indexer(np.asarray(chunk, dtype=np.int64)))

        return top_k_by_score(score, users[ok].tolist(), self.movie_ids, k, exclude)


def _dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


# --- the baselines ---------------------------------------------------------------------------------------------


def ease_ranker(matrix: Matrix, x: sp.csr_matrix, gram: np.ndarray, lam: float) -> Ranker:
    from pipeline.models.ease import ease_weights

    b = ease_weights(gram, lam)
    return Ranker(matrix, lambda rows: _dense(x[rows] @ b))


def ials_factors(matrix: Matrix, factors: int, reg: float, alpha: float, iters: int, threads: int, seed: int):
    """(user factors, catalogue item factors) of ``implicit``'s CPU ALS on confidence 1 + alpha * rating/5
    (the library takes each stored value as the confidence of a positive; the unstored ones weigh 1)."""
    from implicit.cpu.als import AlternatingLeastSquares

    conf = matrix.weighted(lambda r: 1.0 + alpha * r / 5.0, catalogue=False)
    model = AlternatingLeastSquares(factors=factors, regularization=reg, alpha=1.0, iterations=iters,
                                    num_threads=threads, random_state=seed)
    model.fit(conf, show_progress=False)
    return np.asarray(model.user_factors), np.asarray(model.item_factors)[matrix.catalogue]


def ials_ranker(matrix: Matrix, users: np.ndarray, items: np.ndarray) -> Ranker:
    return Ranker(matrix, lambda rows: users[rows] @ items.T)


def _top_per_row(w: np.ndarray, neighbours: int) -> np.ndarray:
    """``w`` with all but each row's ``neighbours`` largest entries set to 0 (in place; 0: every entry kept)."""
    if 0 < neighbours < w.shape[1]:
        drop = np.argpartition(-w, neighbours, axis=1)[:, neighbours:]
        np.put_along_axis(w, drop, 0.0, axis=1)
    return w


def rp3beta_ranker(matrix: Matrix, alpha: float, beta: float, neighbours: int) -> Ranker:
    """RP3beta: W = (P_iu P_ui)^alpha-weighted random walk item -> user -> item, each target's column divided
    by its popularity^beta, each item's ``neighbours`` strongest targets kept (0: all); scores = binary history x W."""
    x = matrix.weighted(np.ones_like)
    p_ui = sp.diags(1.0 / np.maximum(np.asarray(x.sum(axis=1)).ravel(), 1)) @ x
    xt = x.T.tocsr()
    p_iu = sp.diags(1.0 / np.maximum(np.asarray(xt.sum(axis=1)).ravel(), 1)) @ xt
    p_ui.data **= alpha
    p_iu.data **= alpha
    pop = np.asarray(x.sum(axis=0)).ravel()
    w = _dense(p_iu @ p_ui).astype(np.float32) / np.maximum(pop, 1)[None, :].astype(np.float32) ** beta
    np.fill_diagonal(w, 0.0)
    w = _top_per_row(w, neighbours)
    return Ranker(matrix, lambda rows: _dense(x[rows] @ w))


def knn_ranker(matrix: Matrix, neighbours: int) -> Ranker:
    """Item-kNN: cosine of the binary training columns, each movie's ``neighbours`` most similar movies kept;
    a user's score for a movie is the sum of its similarities to their history."""
    x = matrix.weighted(np.ones_like)
    co = _dense(x.T @ x).astype(np.float32)
    norms = np.sqrt(np.diag(co)).copy()
    sim = co / np.maximum(np.outer(norms, norms), 1e-12)
    np.fill_diagonal(sim, 0.0)
    sim = _top_per_row(sim.T.copy(), neighbours).T  # each target movie keeps its nearest sources
    return Ranker(matrix, lambda rows: _dense(x[rows] @ sim))


def _min_max(scores: np.ndarray) -> np.ndarray:
    """Each row's scores mapped onto [0, 1] (its lowest 0, its highest 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    low, high = scores.min(axis=1, keepdims=True), scores.max(axis=1, keepdims=True)
    return (scores - low) / np.where(high > low, high - low, 1.0)


def blend_ranker(matrix: Matrix, first: Ranker, second: Ranker, weight: float) -> Ranker:
    """``weight`` x first + (1 - weight) x second, each user's scores min-max scaled over the catalogue."""
    return Ranker(matrix, lambda rows: weight * _min_max(first.scores(rows))
                  + (1 - weight) * _min_max(second.scores(rows)))


# --- the bench ---------------------------------------------------------------------------------------------------


class Bench:
    """Runs each grid on validation, then measures the chosen models on both splits; keeps the table's rows."""

    def __init__(self, split, log=print):
        self.split, self.log, self.rows, self.grids = split, log, [], {}

    def val(self, ranker) -> float:
        from pipeline.models.ranking import evaluate_ranking

        return evaluate_ranking(ranker, self.split, splits=("val",))["val_ndcg_at_10"] or 0.0

    def search(self, family: str, points: list, make):
        """The point of ``points`` whose ranker (``make(point)``) has the best validation NDCG@10 (the first of
        equals): (point, ranker, its validation NDCG@10)."""
        best, grid = None, []
        for point in points:
            t0 = time.perf_counter()
            ranker = make(point)
            ndcg = self.val(ranker)
            grid.append({**point, "val_ndcg_at_10": ndcg, "seconds": round(time.perf_counter() - t0, 2)})
            self.log(f"  {family} {_describe(point)}: validation NDCG@10 {ndcg:.4f} ({grid[-1]['seconds']:.1f} s)")
            if best is None or ndcg > best[2]:
                best = (point, ranker, ndcg)
        self.grids[family] = grid
        return best

    def add(self, label: str, ranker, source: str = "bench") -> dict:
        from pipeline.models.ranking import evaluate_ranking

        scores = evaluate_ranking(ranker, self.split)
        row = {"model": label, "source": source, **{k: scores.get(k) for k in COLUMNS}, "users": scores.get("users")}
        self.rows.append(row)
        self.log(f"{label}: validation NDCG@10 {row['val_ndcg_at_10']:.4f}, test NDCG@10 {row['test_ndcg_at_10']:.4f}")
        return row


def _describe(point: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in point.items())


def run_bench(split, params, args, log=print) -> Bench:
    from threadpoolctl import threadpool_limits

    from pipeline.models.popularity import PopularityRanker

    bench = Bench(split, log)
    matrix = Matrix(split.train, params.ease_min_ratings)
    log(f"training matrix: {len(matrix.users):,} users x {len(matrix.movies):,} movies, "
        f"{matrix.ratings.nnz:,} ratings; catalogue {len(matrix.catalogue):,} movies "
        f"(>= {params.ease_min_ratings} training ratings)")
    bench.add("popularity", PopularityRanker(split.train))
    has_implicit = _has_implicit()
    with threadpool_limits(limits=1, user_api="blas"):
        best_ease = None
        for name in args.ease_inputs.split(","):
            x = matrix.weighted(EASE_INPUTS[name])
            gram = _dense(x.T @ x).astype(np.float32)
            point, ranker, ndcg = bench.search(f"EASE {name}", [{"lambda": lam} for lam in _floats(args.ease_lambdas)],
                                               lambda p, x=x, gram=gram: ease_ranker(matrix, x, gram, p["lambda"]))
            bench.add(f"EASE, input {name}, lambda {point['lambda']:g}", ranker)
            if best_ease is None or ndcg > best_ease[2]:
                best_ease = (name, ranker, ndcg)
        best_als = None
        if has_implicit:
            points = [{"factors": f, "reg": r, "alpha": a} for f in _ints(args.ials_factors)
                      for r in _floats(args.ials_regs) for a in _floats(args.ials_alphas)]
            best_als = bench.search("implicit ALS", points, lambda p: ials_ranker(matrix, *ials_factors(
                matrix, p["factors"], p["reg"], p["alpha"], args.ials_iters, args.threads, args.seed)))
            p = best_als[0]
            bench.add(f"implicit ALS, confidence 1 + {p['alpha']:g} * rating/5, reg {p['reg']:g}, "
                      f"{p['factors']} factors", best_als[1])
        else:
            log("the `implicit` library is not installed: no implicit ALS row, no blend")
        points = [{"alpha": a, "beta": b} for a in _floats(args.rp3_alphas) for b in _floats(args.rp3_betas)]
        p, ranker, _ = bench.search("RP3beta", points,
                                    lambda p: rp3beta_ranker(matrix, p["alpha"], p["beta"], args.rp3_neighbours))
        kept = f", {args.rp3_neighbours} neighbours" if args.rp3_neighbours else ""
        bench.add(f"RP3beta, alpha {p['alpha']:g}, beta {p['beta']:g}{kept}", ranker)
        p, ranker, _ = bench.search("item-kNN", [{"neighbours": n} for n in _ints(args.knn_neighbours)],
                                    lambda p: knn_ranker(matrix, p["neighbours"]))
        bench.add(f"item-kNN cosine, {p['neighbours']} neighbours", ranker)
        if best_als is not None:
            p, ranker, _ = bench.search("blend", [{"ease_weight": w} for w in _floats(args.blend_weights)],
                                        lambda p: blend_ranker(matrix, best_ease[1], best_als[1], p["ease_weight"]))
            w = p["ease_weight"]
            bench.add(f"blend {w:g} EASE ({best_ease[0]}) + {1 - w:g} implicit ALS", ranker)
    return bench


def _has_implicit() -> bool:
    """Whether ``implicit`` imports (imported here, before the BLAS limit, so that it covers the BLAS it loads)."""
    try:
        import implicit.cpu.als  # noqa: F401
    except ImportError:
        return False
    return True


def project_rows(report: dict) -> list[dict]:
    """The run's own ranking rows (report.json): popularity and every ranking candidate, "this project"."""
    ranking = report.get("ranking", {})
    found = ([("popularity", ranking["popularity"])] if ranking.get("popularity") else []) \
        + list(ranking.get("candidates", {}).items())
    best = ranking.get("best_by_validation_ndcg")
    return [{"model": f"{name}{' (best by validation)' if name == best else ''}", "source": "this project",
             **{k: figures.get(k) for k in COLUMNS}, "users": figures.get("users")} for name, figures in found]


def table(rows: list[dict]) -> str:
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| model | val NDCG@10 | test NDCG@10 | test P@10 | test R@10 |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        label = f"{r['model']} (this project)" if r["source"] == "this project" else r["model"]
        lines.append(f"| {label} | " + " | ".join(fmt(r[k]) for k in COLUMNS) + " |")
    return "\n".join(lines)


def popularity_check(bench_rows: list[dict], report: dict) -> str | None:
    """Whether the bench's popularity row equals the run's (same split, same protocol): a line to print."""
    theirs = report.get("ranking", {}).get("popularity")
    ours = next((r for r in bench_rows if r["model"] == "popularity"), None)
    if not theirs or ours is None:
        return None
    diff = max(abs((ours[k] or 0.0) - (theirs.get(k) or 0.0)) for k in COLUMNS)
    verdict = "the same figures" if diff <= 1e-12 else "DIFFERENT figures (not the run's split or sample?)"
    return f"popularity against the run's report.json: {verdict} (largest difference {diff:.1e})"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", "--work-dir", dest="run_dir", required=True,
                        help="a run folder whose etl and baseline stages have completed")
    parser.add_argument("--json", help="also write the rows and every grid point here")
    parser.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 4)),
                        help="implicit's fitting threads (BLAS stays at one)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ease-inputs", default=",".join(EASE_INPUTS))
    parser.add_argument("--ease-lambdas", default="25,50,100,200,400,800")
    parser.add_argument("--ials-factors", default="64,128,256")
    parser.add_argument("--ials-regs", default="20,50,100")
    parser.add_argument("--ials-alphas", default="5,10,20")
    parser.add_argument("--ials-iters", type=int, default=15)
    parser.add_argument("--rp3-alphas", default="0.25,0.5,0.75,1")
    parser.add_argument("--rp3-betas", default="0.2,0.35,0.5,0.65")
    parser.add_argument("--rp3-neighbours", type=int, default=0, help="targets kept per movie (0: all)")
    parser.add_argument("--knn-neighbours", default="50,100,200")
    parser.add_argument("--blend-weights", default=",".join(f"{w / 10:g}" for w in range(11)))
    args = parser.parse_args(argv)
    unknown = [name for name in args.ease_inputs.split(",") if name not in EASE_INPUTS]
    if unknown:
        parser.error(f"--ease-inputs: unknown {', '.join(unknown)} (known: {', '.join(EASE_INPUTS)})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    split, report, params = load_run(Path(args.run_dir))
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    bench = run_bench(split, params, args, log)
    rows = bench.rows + project_rows(report)
    users = bench.rows[0]["users"]
    print(f"ranking baselines on {args.run_dir} ({users} test users; validation chooses, test reports)\n")
    print(table(rows))
    check = popularity_check(bench.rows, report)
    if check:
        print(f"\n{check}")
    seconds = time.perf_counter() - started
    print(f"\n{seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"run_dir": str(args.run_dir), "seconds": round(seconds, 1),
                                               "rows": rows, "grids": bench.grids}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
