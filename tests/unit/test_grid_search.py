"""The one grid search both ALS stages run (``pipeline.models.als``): which fit it chooses when a fit diverges
(NaN) or two fits tie, the same way for the explicit grid (lower validation RMSE is better) and the implicit
one (higher validation NDCG@10 is better)."""

from __future__ import annotations

import pytest
from test_ranking import clustered_choices

from pipeline import stages
from pipeline.config import load_settings
from stage_inputs import write_split

NAN = float("nan")


def _implicit_section(tmp_path, monkeypatch, ndcg_of, **params) -> dict:
    """The implicit_als stage on the clustered choices, a 2 x 2 grid halved at eta 3 (tiny data counts as large),
    every fit scored ``ndcg_of(fitted point)`` on validation: its report section."""
    from pipeline.models import implicit_als

    monkeypatch.setattr(implicit_als, "HALVING_MIN_ROWS", 1)
    monkeypatch.setattr(implicit_als, "evaluate_ranking",
                        lambda model, split, **kwargs: {"val_ndcg_at_10": ndcg_of(model.meta["params"])})
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    write_split(tmp_path / "run" / "etl", clustered_choices())
    ctx = stages.make_context(run_id="grid", work_dir=tmp_path / "run", settings=settings, params={
        "ials_ranks": [2, 8], "ials_reg_params": [0.1, 1.0], "ials_alphas": [1.0], "ials_max_iters": [9],
        "als_halving_eta": 3, **params})
    for stage in ("baseline", "implicit_als"):
        stages.run_stage(stage, ctx)
    return stages.report.write_report(ctx, stages.ORDER)["models"]["implicit_als"]


@pytest.mark.spark
def test_the_implicit_search_never_chooses_a_diverged_fit_and_breaks_a_tie_by_the_earlier_point(
        spark, tmp_path, monkeypatch):
    """Regression: the grid's first fit (rank 2, regParam 0.1) diverges and every other fit ties. The choice was
    ``(ndcg, full, -i) > best``, False against a NaN, so the first fit, scored first one fit at a time, stayed the
    model; now the NaN ranks below every score and the tie goes to the fit with all its iterations, then to the
    earlier grid point."""
    section = _implicit_section(tmp_path, monkeypatch,
                                lambda p: NAN if (p["rank"], p["reg_param"]) == (2, 0.1) else 0.5,
                                als_parallel_fits=1)
    assert section["best_params"] == {"rank": 2, "reg_param": 1.0, "alpha": 1.0, "max_iter": 9}
    grid = section["grid"]
    assert grid[0]["rung_iters"] == [3]  # the diverged screen fit is cut, however NaN compares
    assert [g["rung_iters"] for g in grid[1:]] == [[3, 9], [3, 9], [3]]
