"""``recsys synth``: a synthetic MovieLens-CSV folder (ratings, movies, tags, links) of realistic shape, for
measuring the pipeline at sizes beyond the real samples.

The shape: power-law movie popularity (Zipf over a random order of the movies) and user activity (at least
``MIN_USER_RATINGS`` each, a Pareto tail); each user watches partly by popularity and partly inside a few
preferred genres, so the ranking models have something beyond popularity to learn; ratings are
``mean + user bias + movie bias + user factors . movie factors + noise`` rounded to half stars, where the
movie factors sit near their main genre's factors (a planted low-rank taste structure); timestamps spread
over each user's active years between 1996 and 2023. Deterministic by seed: the catalogue and the users'
parameters come from ``seed``, each block of users from ``(seed, block)``.

Written in blocks of users: memory grows with users x rank and movies, never with the number of ratings.

``--out`` is written whole or not at all (a temporary folder beside it, renamed into place), and only where
nothing else can be lost: a new or empty folder, or one synth wrote before (its ``synth.json``, the marker,
records how). A folder holding anything else (a real dataset) or an unusable path is a ConfigError naming it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

GENRES = ("Drama", "Comedy", "Thriller", "Action", "Romance", "Adventure", "Crime", "Sci-Fi", "Horror", "Fantasy",
          "Children", "Animation", "Mystery", "Documentary", "War", "Musical", "Western", "IMAX", "Film-Noir")
# roughly MovieLens' genre frequencies (main genre of a movie)
_GENRE_WEIGHTS = np.array([25, 20, 10, 9, 8, 5, 5, 4, 5, 3, 2, 2, 2, 3, 1.5, 1, 1, .5, .5])
_TAG_WORDS = ("funny", "atmospheric", "twist ending", "visually appealing", "dark comedy", "classic",
              "thought-provoking", "quirky", "based on a book", "great soundtrack", "slow", "overrated")
MIN_USER_RATINGS = 20  # as in every MovieLens release
FIRST_TS = 820_454_400  # 1996-01-01
LAST_TS = 1_696_118_400  # 2023-10-01: fixed, so that the output does not depend on today
MARKER = "synth.json"  # the summary synth writes last: a folder with it (as synth writes it) is synth's
OUTPUT_FILES = ("ratings.csv", "movies.csv", "tags.csv", "links.csv", MARKER)
_MARKER_KEYS = {"ratings", "users", "movies", "seed", "shape"}
BLOCK_RATINGS = 500_000  # ratings per written block (about 40 MB of working memory)


@dataclass(frozen=True)
class SynthShape:
    """The knobs of the generated structure (defaults: MovieLens-like)."""

    rank: int = 8  # planted taste dimensions
    popularity_exponent: float = 0.9  # Zipf exponent of movie popularity
    popularity_offset: float = 30.0  # flattens the very top (the most popular movie draws ~1 % of ratings)
    activity_shape: float = 1.5  # Pareto shape of user activity (smaller: heavier tail)
    genre_share: float = 0.7  # share of a user's picks made inside the preferred genres
    mean: float = 3.5
    user_bias_sd: float = 0.45
    movie_bias_sd: float = 0.3
    taste_sd: float = 0.7  # standard deviation of the planted user . movie term
    noise_sd: float = 0.65
    tag_share: float = 0.03


def _activity(rng, users: int, ratings: int, movies: int, shape: SynthShape) -> np.ndarray:
    """Ratings per user: at least the MovieLens minimum (less on tiny sets) plus a Pareto tail, capped at a third
    of the catalogue, summing to ``ratings``."""
    floor = int(min(MIN_USER_RATINGS, max(1, ratings // (2 * users))))
    cap = max(floor, movies // 3)  # drawing more distinct movies than this from a power law gets slow
    tail = rng.pareto(shape.activity_shape, users) + 1e-3
    lo, hi = 0.0, float(ratings) / tail.min()
    for _ in range(100):  # water-filling: the scale of the tail at which the capped counts add up
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(floor + mid * tail, cap).sum() < ratings else (lo, mid)
    counts = np.minimum(floor + np.floor(lo * tail), cap).astype(np.int64)
    short = ratings - int(counts.sum())  # the rounding remainder, one each
    if short > 0:
        room = np.flatnonzero(counts < cap)
        counts[rng.choice(room, min(short, len(room)), replace=False)] += 1
    return counts


class _World:
    """The catalogue and the users' parameters: everything except the ratings themselves."""

    def __init__(self, ratings: int, users: int, movies: int, seed: int, shape: SynthShape):
        rng = np.random.default_rng(seed)
        self.shape, self.users, self.movies = shape, users, movies
        order = rng.permutation(movies)
        self.popularity = (order + shape.popularity_offset) ** -shape.popularity_exponent
        self.popularity /= self.popularity.sum()
        g = len(GENRES)
        self.genre = rng.choice(g, movies, p=_GENRE_WEIGHTS / _GENRE_WEIGHTS.sum())
        self.extra_genres = [rng.choice(g, rng.integers(0, 3), replace=False) for _ in range(movies)]
        # years: skewed to recent decades
        self.year = np.clip(2023 - np.floor(rng.exponential(14.0, movies)), 1915, 2023).astype(np.int64)
        self.movie_bias = rng.normal(0, shape.movie_bias_sd, movies) + 0.1 * (np.log(self.popularity)
                                                                              - np.log(self.popularity).mean())
        scale = shape.taste_sd ** 0.5 / shape.rank ** 0.25  # so that p . q has about taste_sd
        genre_factors = rng.normal(0, scale, (g, shape.rank))
        self.movie_factors = genre_factors[self.genre] * 0.8 + rng.normal(0, scale * 0.6, (movies, shape.rank))
        self.genre_pref = rng.dirichlet(np.full(g, 0.3), users)  # a few preferred genres each
        # tastes lean towards the preferred genres: users watch more of what they like, and rate it higher
        self.user_factors = 0.7 * self.genre_pref @ genre_factors + rng.normal(0, 0.7 * scale, (users, shape.rank))
        self.user_bias = rng.normal(0, shape.user_bias_sd, users)
        self.activity = _activity(rng, users, ratings, movies, shape)
        self.start = rng.integers(FIRST_TS, LAST_TS - 86_400, users)
        span = np.exp(rng.normal(np.log(200 * 86_400), 1.5, users))
        self.end = np.minimum(self.start + span.astype(np.int64) + 3_600, LAST_TS)
        # per-genre popularity tables for the genre-driven picks
        self.genre_movies = [np.flatnonzero(self.genre == k) for k in range(g)]
        self.genre_cdf = [np.cumsum(self.popularity[m]) / self.popularity[m].sum() if len(m) else None
                          for m in self.genre_movies]
        self.cdf = np.cumsum(self.popularity)

    def _draw(self, rng, user_rows: np.ndarray) -> np.ndarray:
        """One movie per entry of ``user_rows`` (with replacement): by popularity or inside a preferred genre."""
        n = len(user_rows)
        movies = np.minimum(np.searchsorted(self.cdf, rng.random(n) * self.cdf[-1]), self.movies - 1)
        by_genre = rng.random(n) < self.shape.genre_share
        if by_genre.any():
            rows = user_rows[by_genre]
            pref_cdf = np.cumsum(self.genre_pref[rows], axis=1)
            genres = (pref_cdf < rng.random(len(rows))[:, None] * pref_cdf[:, -1:]).sum(axis=1)
            picked = np.empty(len(rows), np.int64)
            for k in np.unique(genres):
                sel = genres == k
                if self.genre_cdf[k] is None:  # a genre without movies on a tiny catalogue
                    picked[sel] = movies[by_genre][sel]
                    continue
                at = np.searchsorted(self.genre_cdf[k], rng.random(sel.sum()))
                picked[sel] = self.genre_movies[k][np.minimum(at, len(self.genre_movies[k]) - 1)]
            movies[by_genre] = picked
        return movies

    def block(self, rng, first: int, last: int) -> pd.DataFrame:
        """The ratings of users ``first .. last - 1`` (0-based), sorted by user then movie."""
        users = np.arange(first, last)
        want = self.activity[first:last]
        keys = np.empty(0, np.int64)
        for _ in range(8):  # draw, drop repeats, draw again for the users still short
            have = np.bincount((keys // self.movies) - first, minlength=len(users)) if len(keys) else np.zeros(
                len(users), np.int64)
            short = want - have
            if short.max() <= 0:
                break
            rows = np.repeat(users, np.ceil(np.maximum(short, 0) * 1.3).astype(np.int64) + (short > 0))
            keys = np.concatenate([keys, rows * self.movies + self._draw(rng, rows)])
            _, first_seen = np.unique(keys, return_index=True)
            keys = keys[np.sort(first_seen)]  # draw order kept: the first picks are kept below
            user_of = keys // self.movies - first
            order = np.argsort(user_of, kind="stable")
            starts = np.searchsorted(user_of[order], np.arange(len(users)))
            rank_in_user = np.empty(len(keys), np.int64)
            rank_in_user[order] = np.arange(len(keys)) - starts[user_of[order]]
            keys = keys[rank_in_user < want[user_of]]
        keys.sort()
        u, m = keys // self.movies, keys % self.movies
        s = self.shape
        raw = (s.mean + self.user_bias[u] + self.movie_bias[m] + np.einsum("ij,ij->i", self.user_factors[u],
                                                                           self.movie_factors[m])
               + rng.normal(0, s.noise_sd, len(keys)))
        rating = np.clip(np.round(raw * 2) / 2, 0.5, 5.0)
        ts = self.start[u] + (rng.random(len(keys)) * (self.end[u] - self.start[u])).astype(np.int64)
        return pd.DataFrame({"userId": u + 1, "movieId": m + 1, "rating": rating, "timestamp": ts})


def _title(i: int, year: int) -> str:
    # a few titles with a comma (quoted in the CSV, as in MovieLens: "American President, The (1995)")
    return f"Synthetic Movie {i}, The ({year})" if i % 17 == 0 else f"Synthetic Movie {i} ({year})"


def writable_out(out: Path | str) -> Path:
    """``out`` as a folder synth may (re)write: a new or empty folder, or one synth wrote; its parent is made and
    must take a file. ConfigError naming the path otherwise, before anything is written."""
    given = out
    out = Path(os.path.abspath(out))
    if out == out.parent:
        raise ConfigError(f"synth --out {given}: the root folder cannot be replaced; give a folder for the files")
    if out.is_symlink():
        raise ConfigError(f"synth --out {given}: is a link; give the folder itself (synth replaces --out whole, "
                          f"which would replace the link, not the folder it points to)")
    if os.path.lexists(out) and not out.is_dir():
        raise ConfigError(f"synth --out {given}: is a file, not a folder; give a new folder or one synth wrote")
    try:
        held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except OSError as exc:
        raise ConfigError(f"synth --out {given}: cannot be listed ({exc.strerror or exc})") from exc
    if held and not _written_by_synth(out, held):
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        why = (f"no {MARKER}" if MARKER not in held else
               "files synth does not write" if any(name not in OUTPUT_FILES for name in held) else
               f"a {MARKER} that synth did not write")
        raise ConfigError(f"synth --out {given}: is not a folder synth wrote (it holds {shown}: {why}); it may be a "
                          f"real dataset, so it is left as it is: give a new or empty folder, or one synth wrote")
    try:  # the temporary folder goes beside ``out``: its parent must take one
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".synth-probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(f"synth --out {given}: a part of the path is a file, not a folder") from exc
    except OSError as exc:
        raise ConfigError(f"synth --out {given}: cannot be written here ({exc.strerror or exc}); choose a folder "
                          f"on a writable disk") from exc
    return out


def _written_by_synth(folder: Path, held: list[str]) -> bool:
    """Whether ``folder`` (holding ``held``) is one synth wrote: only its files, and its marker as synth writes
    it. A dataset with a synth.json of its own, or with any other file, is not."""
    if MARKER not in held or any(name not in OUTPUT_FILES for name in held):
        return False
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and _MARKER_KEYS <= set(marker)


def write_synthetic(out: Path, ratings: int, users: int, movies: int, seed: int = 42,
                    shape: SynthShape = SynthShape()) -> dict:
    """Write ratings.csv, movies.csv, tags.csv and links.csv (ml-latest CSV format) into ``out``; a summary."""
    if min(ratings, users, movies) < 1:
        raise ConfigError("synth: ratings, users and movies must be positive")
    if ratings > users * movies // 3:
        raise ConfigError(f"synth: {ratings} ratings do not fit {users} users x {movies} movies "
                          f"(at most a third filled)")
    out = writable_out(out)
    started = time.perf_counter()
    world = _World(ratings, users, movies, seed, shape)
    with storage.atomic_dir(out) as tmp:
        movie_ids = np.arange(1, movies + 1)
        genres = ["|".join(GENRES[k] for k in dict.fromkeys([world.genre[i], *world.extra_genres[i]]))
                  for i in range(movies)]
        pd.DataFrame({"movieId": movie_ids, "title": [_title(i, y) for i, y in zip(movie_ids, world.year)],
                      "genres": genres}).to_csv(tmp / "movies.csv", index=False, quoting=csv.QUOTE_MINIMAL)
        pd.DataFrame({"movieId": movie_ids, "imdbId": [f"{100000 + i:07d}" for i in movie_ids],
                      "tmdbId": movie_ids + 10_000}).to_csv(tmp / "links.csv", index=False)
        written = tags = 0
        cuts = np.searchsorted(np.cumsum(world.activity), np.arange(BLOCK_RATINGS, ratings, BLOCK_RATINGS))
        edges = sorted({0, users, *(int(c) + 1 for c in cuts if c + 1 < users)})
        with open(tmp / "ratings.csv", "w", newline="") as rf, open(tmp / "tags.csv", "w", newline="") as tf:
            rf.write("userId,movieId,rating,timestamp\n")
            tf.write("userId,movieId,tag,timestamp\n")
            for b, (first, last) in enumerate(zip(edges[:-1], edges[1:])):
                rng = np.random.default_rng([seed, b + 1])
                block = world.block(rng, first, last)
                block.to_csv(rf, header=False, index=False, float_format="%.1f")
                tagged = block[rng.random(len(block)) < shape.tag_share]
                pd.DataFrame({"userId": tagged.userId, "movieId": tagged.movieId,
                              "tag": np.asarray(_TAG_WORDS)[rng.integers(0, len(_TAG_WORDS), len(tagged))],
                              "timestamp": tagged.timestamp}).to_csv(tf, header=False, index=False)
                written += len(block)
                tags += len(tagged)
                log.info("synth: %d/%d ratings written (users %d/%d)", written, ratings, last, users)
        summary = {"out": str(out), "ratings": written, "users": users, "movies": movies, "tags": tags,
                   "seed": seed, "shape": dataclasses.asdict(shape), "seconds": round(time.perf_counter() - started, 1)}
        (tmp / "synth.json").write_text(storage.strict_json(summary, indent=2))
    log.info("synth: %s", summary)
    return summary
