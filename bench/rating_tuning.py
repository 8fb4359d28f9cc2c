"""Tuning the rating models where the curves say it may pay, on a finished run's split; every point an MLflow
child run (parents ``tune-autorec`` / ``tune-als``), chosen on validation RMSE only.

    RECSYS_HOME=... .venv/bin/python bench/rating_tuning.py --work-dir RUN [--autorec] [--als]
        [--units 100,200,400] [--l2 10,30,100] [--lrs 0.001] [--decays 1.0,0.97]
        [--ranks 50,75,100,150] [--regs 0.1,0.125,0.15]

For each model it prints the validation RMSE of every point and, for the best point, the blend's out-of-fold
validation RMSE with that model in place of the run's (``pipeline.models.blend.fit_blend``): what matters is
whether the blend gains, not the single model. Test rows are never read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path


def _floats(text):
    return [float(x) for x in text.split(",") if x]


def _blend_val(ctx, split, baseline, replace: dict) -> float:
    from pipeline.models.blend import fit_blend
    from pipeline.models.metrics import rmse
    from pipeline.models.rating_stages import blend_members

    members = {**blend_members(ctx), **replace}
    _, measured = fit_blend(members, split.train, split.validation, baseline, support=ctx.params.blend_support,
                            ridges=ctx.params.blend_ridges, folds=ctx.params.blend_folds, seed=ctx.params.seed)
    return rmse(split.validation["rating"].to_numpy(), measured["validation_predictions"])


def tune_autorec(ctx, split, baseline, args) -> dict:
    from pipeline import tracking
    from pipeline.models.autorec import configure_threads, train_autorec
    from pipeline.models.metrics import rating_metrics

    configure_threads()
    p = ctx.params
    points = [{"hidden_units": int(u), "l2": l2, "learning_rate": lr, "lr_decay": d}
              for u, l2, lr, d in itertools.product(args.units.split(","), _floats(args.l2), _floats(args.lrs),
                                                    _floats(args.decays))]
    results, best = [], None
    with tracking.start_run(ctx, "tune-autorec", split.summary) as parent:
        for point in points:
            name = "autorec " + " ".join(f"{k}={v:g}" for k, v in point.items())
            with tracking.child_run(parent, ctx, name, split.summary) as record:
                started = time.perf_counter()
                model, history = train_autorec(split.train, split.validation, baseline=baseline, seed=p.seed,
                                               dropout=p.autorec_dropout,
                                               epochs=p.autorec_epochs, batch_size=p.autorec_batch_size,
                                               patience=p.autorec_patience, **point)
                model.fallback = baseline
                val = rating_metrics(split.validation, model.predict, baseline, split.train, split="val")["val_rmse"]
                seconds = time.perf_counter() - started
                record(point, {"val_rmse": val, "fit_s": seconds, "best_epoch": model.meta["best_epoch"]})
            row = {**point, "val_rmse": round(val, 5), "best_epoch": model.meta["best_epoch"],
                   "fit_s": round(seconds, 1)}
            print("autorec", row, flush=True)
            results.append(row)
            if best is None or val < best[0]["val_rmse"]:
                best = (row, model)
    blend = _blend_val(ctx, split, baseline, {"autorec": best[1]})
    return {"grid": results, "best": best[0], "blend_val_rmse_with_best": round(blend, 5)}


def tune_als(ctx, split, baseline, args) -> dict:
    from pipeline import tracking
    from pipeline.models.als import grid_points, search_grid
    from pipeline.spark import get_spark

    p = ctx.params
    points = grid_points([int(r) for r in args.ranks.split(",")], _floats(args.regs), p.als_max_iters)
    with tracking.start_run(ctx, "tune-als", split.summary) as parent:
        def track(point):
            name = f"als rank={point['rank']} reg={point['reg_param']:g} iters={point['max_iter']}"
            return tracking.child_run(parent, ctx, name, split.summary)

        results, model = search_grid(get_spark(ctx.settings), split.train, split.validation, baseline, points,
                                     seed=p.seed, workers=p.als_parallel_fits, track=track)
    for row in results:
        print("als", {k: row[k] for k in ("rank", "reg_param", "val_rmse", "fit_s")}, flush=True)
    best = min(results, key=lambda r: r["val_rmse"])
    blend = _blend_val(ctx, split, baseline, {"als": model})
    return {"grid": results, "best": best, "blend_val_rmse_with_best": round(blend, 5)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", required=True, help="a finished `recsys run` folder (split, baseline, models)")
    parser.add_argument("--autorec", action="store_true")
    parser.add_argument("--als", action="store_true")
    parser.add_argument("--units", default="100,200,400")
    parser.add_argument("--l2", default="10,30,100")
    parser.add_argument("--lrs", default="0.001")
    parser.add_argument("--decays", default="1.0,0.97")
    parser.add_argument("--ranks", default="50,75,100,150")
    parser.add_argument("--regs", default="0.1,0.125,0.15")
    args = parser.parse_args()

    from pipeline import stages
    from pipeline.config import load_settings
    from pipeline.models.protocol import load_baseline, load_split

    run_dir = Path(args.work_dir)
    ctx = stages.make_context(work_dir=run_dir, settings=load_settings())
    split, baseline = load_split(ctx, "tuning"), load_baseline(ctx, "tuning")
    out = {"blend_val_rmse_of_the_run": round(_blend_val(ctx, split, baseline, {}), 5)}
    print("blend of the run's models, out-of-fold validation RMSE", out["blend_val_rmse_of_the_run"], flush=True)
    if args.autorec:
        out["autorec"] = tune_autorec(ctx, split, baseline, args)
    if args.als:
        out["als"] = tune_als(ctx, split, baseline, args)
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "grid"} if isinstance(v, dict) else v)
                      for k, v in out.items()}, indent=2, default=str))
    (run_dir / "tuning.json").write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
