"""Stage ``similarity``: the similar-movie table (Euclidean, cosine, LSH) from the champion's item embeddings.

Parameters of the LSH search are chosen on a sample (``tuning.choose_lsh_params``), then the recall measured
on every movie against the exact cosine table decides: below the target, stronger parameters are tried.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.params import check_k
from pipeline.similarity.exact import (
    EMBEDDINGS,
    EMBEDDINGS_SCHEMA,
    EXACT_METRICS,
    TABLE_SCHEMA,
    embeddings_of,
    exact_rows,
    prepare,
    result_frame,
    write_items,
)
from pipeline.similarity.hashing import LSHParams, check_lsh_params
from pipeline.similarity.lsh import lsh_top_k
from pipeline.similarity.tuning import TIE_TOLERANCE, choose_lsh_params, neighbour_recall

log = logging.getLogger(__name__)

STAGE = "similarity"
TABLE = "similar_movies.parquet"


# --- the stage ---------------------------------------------------------------------------------------------


def _table(frames: dict[str, pd.DataFrame]) -> pa.Table:
    parts = []
    for metric in sorted(frames):
        f = frames[metric].sort_values(["movie_id", "rank"], kind="stable")
        parts.append(pa.Table.from_arrays([
            pa.array(f["movie_id"].to_numpy(np.int64)), pa.array(f["similar_movie_id"].to_numpy(np.int64)),
            pa.array(np.full(len(f), metric, dtype=object), pa.string()),
            pa.array(f["rank"].to_numpy(np.int32)), pa.array(f["score"].to_numpy(np.float64)),
        ], schema=TABLE_SCHEMA))
    return pa.concat_tables(parts)


def similar_items(spark, model_or_embeddings, k: int, out_dir: Path, lsh_params=None, *,
                  target_recall: float = 0.95, rank_on: str = "driver") -> dict:
    """Materialize the similar-movie table (euclidean, cosine, lsh) and the embeddings under ``out_dir``.

    ``model_or_embeddings``: a FactorModel (its item_embeddings()) or (movie_ids, vectors). ``lsh_params``: an
    LSHParams or dict; None chooses them with choose_lsh_params, and when the recall@k measured on all items
    misses ``target_recall`` the chooser's stronger steps are tried (each try in ``lsh_attempts``). The
    reported LSH recall@k is measured on all items against the exact cosine table written beside it.
    """
    k = check_k(k, "similar_k")
    movie_ids, vectors = embeddings_of(model_or_embeddings)
    items = prepare(movie_ids, vectors)
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    chosen = None
    with storage.atomic_dir(out_dir) as tmp:
        emb_path = write_items(tmp / EMBEDDINGS, items)
        rows = np.arange(items.n)
        frames = {}
        tied = None
        for metric in EXACT_METRICS:
            t0 = time.perf_counter()
            # one neighbour more than served, to see whether the k-th place is a tie with the next one
            _, idx, score = exact_rows(items, min(k + 1, items.n - 1), metric)
            if metric == "cosine" and score.shape[1] > k:
                tied = float(np.mean(np.abs(score[:, k - 1] - score[:, k]) <= TIE_TOLERANCE))
            frames[metric] = result_frame(items, rows, idx[:, :k], score[:, :k])
            timings[f"exact_{metric}"] = time.perf_counter() - t0
        if lsh_params is None:
            t0 = time.perf_counter()
            chosen = choose_lsh_params(spark, items.ids, items.x, k, target_recall=target_recall,
                                       embeddings_path=emb_path)
            ladder = [chosen["params"], *chosen["stronger"]]
            timings["lsh_choose"] = time.perf_counter() - t0
        else:
            ladder = [lsh_params if isinstance(lsh_params, LSHParams) else LSHParams(**lsh_params)]
            check_lsh_params(ladder[0])
        # The sample only estimates the recall: the one measured on every item, against the exact cosine table
        # above, decides. Below the target, the chooser's stronger steps are tried; the best run is kept.
        attempts = []
        for params in ladder:
            lsh_timings: dict[str, float] = {}
            frame = lsh_top_k(spark, items.ids, items.x, k, params, rank_on=rank_on, embeddings_path=emb_path,
                              timings=lsh_timings)
            recall = neighbour_recall(frame, frames["cosine"], k)
            attempts.append({"params": params, "frame": frame, "recall": recall, "seconds": lsh_timings["total"]})
            if recall >= target_recall:
                break
            log.info("similarity: LSH recall@%d %.4f on all items with %s, below %.2f", k, recall, params,
                     target_recall)
        best = max(attempts, key=lambda a: a["recall"])  # the first (cheapest) on equal recall
        params, frames["lsh"], recall = best["params"], best["frame"], best["recall"]
        timings["lsh"] = best["seconds"]
        if len(attempts) > 1:
            timings["lsh_escalation"] = sum(a["seconds"] for a in attempts) - best["seconds"]
        if recall < target_recall:
            log.warning("similarity: LSH recall@%d %.4f on all items is below the target %.2f after %d tries "
                        "(serving the best)", k, recall, target_recall, len(attempts))
        recall_ties = neighbour_recall(frames["lsh"], frames["cosine"], k, tie_tolerance=TIE_TOLERANCE)
        t0 = time.perf_counter()
        table = _table(frames)
        pq.write_table(table, tmp / TABLE)
        timings["write"] = time.perf_counter() - t0
        tables = {
            "similar_movies": {"rows": table.num_rows, "path": str(out_dir / TABLE), "columns": table.column_names,
                               "sha256": storage.file_sha256(tmp / TABLE)},
            "embeddings": {"rows": items.n, "path": str(out_dir / EMBEDDINGS), "columns": EMBEDDINGS_SCHEMA.names,
                           "sha256": storage.file_sha256(emb_path)},
        }
        summary = {
            "k": k, "items": items.n, "dimensions": int(items.x.shape[1]),
            "table": str((out_dir / TABLE).resolve()), "embeddings": str((out_dir / EMBEDDINGS).resolve()),
            "lsh_recall_at_k": recall, "lsh_recall_at_k_with_ties": recall_ties, "cosine_tied_lists_share": tied,
            "lsh_target_recall": target_recall, "lsh_target_reached": recall >= target_recall,
            "lsh_params": params.as_dict(),
            "lsh_attempts": [{"params": a["params"].as_dict(), "recall_at_k": round(a["recall"], 4),
                              "seconds": round(a["seconds"], 3)} for a in attempts],
            "lsh_params_search": None if chosen is None else {
                "sample_recall": round(chosen["recall"], 4), "reached": chosen["reached"],
                "sample": chosen["sample"], "candidates_tried": len(chosen["tried"])},
            "timings_s": {name: round(v, 3) for name, v in timings.items()},
        }
        # the manifest also keeps every candidate's sample recall (too long for the XCom summary)
        storage.write_manifest(tmp, STAGE, tables, **{key: v for key, v in summary.items() if key != "timings_s"},
                               lsh_candidates_tried=None if chosen is None else chosen["tried"])
    log.info("similarity: %d items, k=%d, LSH recall@k %.4f with %s", items.n, k, recall, params)
    return {"similarity": summary}


LSH_TARGET_RECALL = 0.95


def run_similarity(ctx) -> dict:
    """Stage ``similarity``: the similar-movie tables from the champion's item embeddings, logged to MLflow."""
    import mlflow

    from pipeline import registry, tracking
    from pipeline.spark import get_spark

    settings = ctx.settings
    preferred = [settings.registered_ranker, settings.registered_model]
    if ctx.params.similarity_source == "rating":
        preferred.reverse()
    model = version = None
    for name in preferred:  # the chosen source's champion, else the other one's (a first run may promote one)
        model, version = registry.load_champion(settings, name)
        if model is not None:
            break
        log.info("similarity: no champion of %s yet", name)
    if model is None:
        log.warning("similarity: no champion in the registry yet (nothing was promoted): nothing to serve")
        return {}
    movie_ids, vectors = model.item_embeddings()
    # Adjusted cosine: a direction every item shares (AutoRec's sigmoid codes sit within a few degrees of
    # their mean) says nothing about which movies are alike, so the embeddings are centred first. Euclidean
    # distances are unchanged; the exported embeddings are the centred ones the tables were computed from.
    vectors = vectors - vectors.mean(axis=0, keepdims=True)
    with tracking.start_run(ctx, "similarity"):
        out = similar_items(get_spark(ctx.settings), (movie_ids, vectors), ctx.params.similar_k,
                            ctx.stage_dir("similarity"), target_recall=LSH_TARGET_RECALL)
        section = out["similarity"]
        section.update(champion_version=version, registered_model=name)
        mlflow.log_params({"k": section["k"], "champion_version": version, "embedding_model": model.name,
                           **{f"lsh_{k}": v for k, v in section["lsh_params"].items()}})
        mlflow.log_metrics({f"lsh_recall_at_{section['k']}": section["lsh_recall_at_k"], "items": section["items"],
                            "lsh_tries": len(section["lsh_attempts"]),
                            **{f"seconds_{name}": v for name, v in section["timings_s"].items()}})
    return out
