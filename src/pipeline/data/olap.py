"""Stage ``olap`` (Spark SQL): summaries of the validated ratings at several levels of granularity.

Tables (parquet, one folder each): ``genre_year`` (GROUPING SETS over genre x release year, plus a ROLLUP over
year), ``user_activity`` (users per activity bucket), ``movie_popularity`` (count and mean rating, movies
with at least ``min_ratings``), ``ratings_per_month``, ``rating_distribution`` and, where the variant has
tags, ``tags_per_movie``. ``summary.md`` (with two plots) is what a person reads first.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline import storage

log = logging.getLogger(__name__)

QUERIES_AT_ONCE = 3

# Each query reads the temp views `ratings`, `movies` (and `tags`); `{min_ratings}` is filled in.
QUERIES = {
    "genre_year": """
        WITH rated AS (
            SELECT r.movie_id, r.rating, m.year, m.genres
            FROM ratings r JOIN movies m ON r.movie_id = m.movie_id
        ),
        rated_genres AS (
            SELECT movie_id, rating, year,
                   explode(CASE WHEN size(genres) = 0 THEN array('(no genres listed)') ELSE genres END) AS genre
            FROM rated
        )
        SELECT CASE grouping_id(genre, year) WHEN 0 THEN 'genre_year' ELSE 'genre' END AS level,
               genre, year, count(*) AS n_ratings, round(avg(rating), 4) AS mean_rating,
               count(DISTINCT movie_id) AS n_movies
        FROM rated_genres GROUP BY GROUPING SETS ((genre, year), (genre))
        UNION ALL
        SELECT CASE grouping_id(year) WHEN 0 THEN 'year' ELSE 'all' END AS level,
               CAST(NULL AS STRING) AS genre, year, count(*) AS n_ratings, round(avg(rating), 4) AS mean_rating,
               count(DISTINCT movie_id) AS n_movies
        FROM rated GROUP BY ROLLUP (year)
    """,
    "user_activity": """
        WITH per_user AS (SELECT user_id, count(*) AS n FROM ratings GROUP BY user_id),
        bucketed AS (
            SELECT n, CASE WHEN n < 20 THEN 1 WHEN n < 50 THEN 20 WHEN n < 100 THEN 50 WHEN n < 200 THEN 100
                           WHEN n < 500 THEN 200 WHEN n < 1000 THEN 500 ELSE 1000 END AS bucket_min
            FROM per_user
        )
        SELECT bucket_min,
               CASE bucket_min WHEN 1 THEN '1-19' WHEN 20 THEN '20-49' WHEN 50 THEN '50-99'
                    WHEN 100 THEN '100-199' WHEN 200 THEN '200-499' WHEN 500 THEN '500-999'
                    ELSE '1000+' END AS ratings_per_user,
               count(*) AS n_users, sum(n) AS n_ratings,
               round(count(*) / sum(count(*)) OVER (), 4) AS share_of_users,
               round(sum(n) / sum(sum(n)) OVER (), 4) AS share_of_ratings
        FROM bucketed GROUP BY bucket_min ORDER BY bucket_min
    """,
    "movie_popularity": """
        SELECT r.movie_id, m.title, m.year, count(*) AS n_ratings, round(avg(r.rating), 4) AS mean_rating,
               rank() OVER (ORDER BY count(*) DESC) AS popularity_rank,
               rank() OVER (ORDER BY avg(r.rating) DESC, count(*) DESC) AS rating_rank
        FROM ratings r LEFT JOIN movies m ON r.movie_id = m.movie_id
        GROUP BY r.movie_id, m.title, m.year
        HAVING count(*) >= {min_ratings}
        ORDER BY n_ratings DESC, r.movie_id
    """,
    "ratings_per_month": """
        SELECT date_trunc('MONTH', timestamp_seconds(ts)) AS month, count(*) AS n_ratings,
               count(DISTINCT user_id) AS n_users, round(avg(rating), 4) AS mean_rating
        FROM ratings GROUP BY 1 ORDER BY 1
    """,
    "rating_distribution": """
        SELECT rating, count(*) AS n_ratings, round(count(*) / sum(count(*)) OVER (), 4) AS share
        FROM ratings GROUP BY rating ORDER BY rating
    """,
    "tags_per_movie": """
        WITH tag_counts AS (
            SELECT movie_id, lower(trim(tag)) AS tag, count(*) AS n FROM tags GROUP BY 1, 2
        ),
        ranked AS (
            SELECT movie_id, tag, n, row_number() OVER (PARTITION BY movie_id ORDER BY n DESC, tag) AS k
            FROM tag_counts
        )
        SELECT t.movie_id, m.title, t.n_tags, t.n_taggers, d.n_distinct_tags, d.top_tags
        FROM (SELECT movie_id, count(*) AS n_tags, count(DISTINCT user_id) AS n_taggers
              FROM tags GROUP BY movie_id) t
        JOIN (SELECT movie_id, count(*) AS n_distinct_tags,
                     transform(array_sort(collect_list(CASE WHEN k <= 3 THEN struct(k, tag) END)), x -> x.tag)
                       AS top_tags
              FROM ranked GROUP BY movie_id) d ON t.movie_id = d.movie_id
        LEFT JOIN movies m ON t.movie_id = m.movie_id
        ORDER BY t.n_tags DESC, t.movie_id
    """,
}


def olap_tables(spark, validate_dir: Path, min_ratings: int) -> dict:
    """Run the OLAP queries on the validated tables; returns {name: DataFrame}."""
    manifest = storage.read_manifest(validate_dir, "olap")
    tables = manifest["tables"]
    for name in ("ratings", "movies", "tags"):
        if name in tables:
            spark.read.parquet(tables[name]["path"]).createOrReplaceTempView(name)
    return {
        name: spark.sql(sql.format(min_ratings=int(min_ratings)))
        for name, sql in QUERIES.items()
        if name != "tags_per_movie" or "tags" in tables
    }


def _plots(frames: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    monthly = frames["ratings_per_month"]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(monthly["month"], monthly["n_ratings"], lw=1)
    ax.set(title="Ratings per month", ylabel="ratings")
    fig.tight_layout()
    fig.savefig(folder / "ratings_per_month.png", dpi=100)
    written.append("ratings_per_month.png")
    activity = frames["user_activity"]
    dist = frames["rating_distribution"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.bar(activity["ratings_per_user"], activity["n_users"])
    a1.set(title="Users by number of ratings", ylabel="users")
    a1.tick_params(axis="x", labelrotation=45)
    a2.bar(dist["rating"].astype(str), dist["n_ratings"])
    a2.set(title="Rating distribution", ylabel="ratings")
    a2.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(folder / "activity_and_ratings.png", dpi=100)
    written.append("activity_and_ratings.png")
    plt.close("all")
    return written


def _markdown_table(df, limit: int = 10) -> str:
    df = df.head(limit)
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines)


def write_summary(frames: dict, folder: Path, dataset: dict, min_ratings: int) -> None:
    """``summary.md``: the few numbers and tables a person looks at first, with the plots beside it."""
    plots = _plots(frames, folder)
    gy = frames["genre_year"]
    genres = gy[gy["level"] == "genre"].sort_values("n_ratings", ascending=False)
    years = gy[gy["level"] == "year"].dropna(subset=["year"]).sort_values("n_ratings", ascending=False)
    pop = frames["movie_popularity"]
    parts = [
        f"# OLAP summary: {dataset.get('variant')}",
        f"{dataset.get('ratings')} ratings by {dataset.get('users')} users of {dataset.get('movies')} movies.",
        *[f"![{p}]({p})" for p in plots],
        "## Most rated movies", _markdown_table(pop[["title", "n_ratings", "mean_rating"]]),
        f"## Best rated movies (at least {min_ratings} ratings)",
        _markdown_table(pop.sort_values("rating_rank")[["title", "n_ratings", "mean_rating"]]),
        "## Genres by number of ratings",
        _markdown_table(genres[["genre", "n_ratings", "mean_rating", "n_movies"]], 20),
        "## Release years by number of ratings", _markdown_table(years[["year", "n_ratings", "mean_rating"]]),
        "## User activity", _markdown_table(frames["user_activity"], 20),
    ]
    if "tags_per_movie" in frames:
        parts += ["## Most tagged movies", _markdown_table(frames["tags_per_movie"][["title", "n_tags", "top_tags"]])]
    (folder / "summary.md").write_text("\n\n".join(parts) + "\n")


def summarize_ratings(spark, validate_dir: Path, out_dir: Path, min_ratings: int = 10) -> dict:
    """Compute and persist the OLAP tables and ``summary.md``; returns their paths."""
    out_dir = Path(out_dir)
    dataset = storage.read_manifest(validate_dir, "olap").get("dataset", {})
    tables = olap_tables(spark, validate_dir, min_ratings)
    written, frames = {}, {}
    with storage.atomic_dir(out_dir) as tmp:

        def persist(name: str) -> None:
            tables[name].coalesce(1).write.parquet(str(tmp / f"{name}.parquet"))
            result = spark.read.parquet(str(tmp / f"{name}.parquet"))  # counted from the file just written
            rows = result.count() if name == "tags_per_movie" else None
            if rows is None or rows <= 100_000:
                frames[name] = result.toPandas()
            written[name] = {"rows": len(frames[name]) if rows is None else rows,
                             "path": str(out_dir / f"{name}.parquet")}

        # the queries at once: each is a handful of small Spark jobs whose scheduling gaps leave the cores idle
        # (docs/adr/0057-olap-tables-three-at-a-time.md)
        with ThreadPoolExecutor(max_workers=QUERIES_AT_ONCE) as pool:
            list(pool.map(persist, tables))
        written = {name: written[name] for name in tables}  # in query order, not in the order they finished
        frames["movie_popularity"] = frames["movie_popularity"].sort_values(["popularity_rank", "movie_id"])
        write_summary(frames, tmp, dataset, min_ratings)
        storage.write_manifest(tmp, "olap", written, min_ratings=min_ratings)
    return {"olap": {"tables": {name: info["path"] for name, info in written.items()},
                     "summary": str(out_dir / "summary.md")}}
