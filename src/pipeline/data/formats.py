"""MovieLens variants described as data: which files, separators, headers, encodings and rating scales.

The loader (``pipeline.data.ingest``) reads this table instead of branching on variant names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HALF_STARS = tuple(x / 2 for x in range(1, 11))  # 0.5 .. 5.0
WHOLE_STARS = (1.0, 2.0, 3.0, 4.0, 5.0)

# ml-100k's u.item carries 19 genre flags in this order (u.genre).
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


@dataclass(frozen=True)
class TableFile:
    """One input file and how to read it into one of the common tables."""

    table: str  # ratings | movies | tags | links
    filename: str
    columns: tuple[str, ...]  # the file's columns, in order (header names when the file has a header)
    rename: dict  # file column -> common column
    delimiter: str
    header: bool
    encodings: tuple[str, ...]  # tried in order; a CSV variant allows UTF-8 only
    quoted: bool = False
    required: bool = True


@dataclass(frozen=True)
class Format:
    name: str
    marker: tuple[str, ...]  # every one of these files present => this format
    rating_values: tuple[float, ...]
    files: tuple[TableFile, ...] = field(default_factory=tuple)


_RATINGS_RENAME = {"userId": "user_id", "movieId": "movie_id", "rating": "rating", "timestamp": "ts"}
_TAGS_RENAME = {"userId": "user_id", "movieId": "movie_id", "tag": "tag", "timestamp": "ts"}
_DAT_RATINGS = ("user_id", "movie_id", "rating", "ts")
_IDENTITY_RATINGS = {c: c for c in _DAT_RATINGS}

FORMATS: tuple[Format, ...] = (
    # ml-latest-small, ml-latest, ml-20m, ml-25m, ml-32m
    Format(
        name="csv",
        marker=("ratings.csv",),
        rating_values=HALF_STARS,
        files=(
            TableFile("ratings", "ratings.csv", ("userId", "movieId", "rating", "timestamp"), _RATINGS_RENAME,
                      ",", True, ("utf-8",), quoted=True),
            TableFile("movies", "movies.csv", ("movieId", "title", "genres"),
                      {"movieId": "movie_id", "title": "title", "genres": "genres"}, ",", True, ("utf-8",),
                      quoted=True),
            TableFile("tags", "tags.csv", ("userId", "movieId", "tag", "timestamp"), _TAGS_RENAME, ",", True,
                      ("utf-8",), quoted=True, required=False),
            TableFile("links", "links.csv", ("movieId", "imdbId", "tmdbId"),
                      {"movieId": "movie_id", "imdbId": "imdb_id", "tmdbId": "tmdb_id"}, ",", True, ("utf-8",),
                      quoted=True, required=False),
        ),
    ),
    Format(
        name="100k",
        marker=("u.data",),
        rating_values=WHOLE_STARS,
        files=(
            TableFile("ratings", "u.data", _DAT_RATINGS, _IDENTITY_RATINGS, "\t", False, ("utf-8", "latin-1")),
            TableFile("movies", "u.item",
                      ("movie_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES_100K),
                      {"movie_id": "movie_id", "title": "title"}, "|", False, ("utf-8", "latin-1")),
        ),
    ),
    # ml-1m ships users.dat and whole-star ratings; ml-10m ships tags.dat and half stars.
    Format(
        name="dat-1m",
        marker=("ratings.dat", "users.dat"),
        rating_values=WHOLE_STARS,
        files=(
            TableFile("ratings", "ratings.dat", _DAT_RATINGS, _IDENTITY_RATINGS, "::", False, ("utf-8", "latin-1")),
            TableFile("movies", "movies.dat", ("movie_id", "title", "genres"),
                      {"movie_id": "movie_id", "title": "title", "genres": "genres"}, "::", False,
                      ("utf-8", "latin-1")),
        ),
    ),
    Format(
        name="dat-10m",
        marker=("ratings.dat",),
        rating_values=HALF_STARS,
        files=(
            TableFile("ratings", "ratings.dat", _DAT_RATINGS, _IDENTITY_RATINGS, "::", False, ("utf-8", "latin-1")),
            TableFile("movies", "movies.dat", ("movie_id", "title", "genres"),
                      {"movie_id": "movie_id", "title": "title", "genres": "genres"}, "::", False,
                      ("utf-8", "latin-1")),
            TableFile("tags", "tags.dat", ("user_id", "movie_id", "tag", "ts"),
                      {"user_id": "user_id", "movie_id": "movie_id", "tag": "tag", "ts": "ts"}, "::", False,
                      ("utf-8", "latin-1"), required=False),
        ),
    ),
)

# Common schema of each table after ingest (column -> arrow type name). Besides these, every row keeps `_line`,
# the line of the file it starts on, and `_raw`, its text as in the file.
SCHEMAS = {
    "ratings": {"user_id": "int64", "movie_id": "int64", "rating": "double", "ts": "int64"},
    "movies": {"movie_id": "int64", "title": "string", "year": "int64", "genres": "list<string>"},
    "tags": {"user_id": "int64", "movie_id": "int64", "tag": "string", "ts": "int64"},
    "links": {"movie_id": "int64", "imdb_id": "string", "tmdb_id": "int64"},
}

# What a common column is made from when no file column is renamed to it.
DERIVED = {("movies", "year"): "the title", ("movies", "genres"): "the genre flags"}

# Column names starting with this are the pipeline's own (`_line`, `_raw`, `_file`, `_reason`, `_movie_known`).
RESERVED_PREFIX = "_"


def detect_format(filenames) -> Format:
    """The first format whose marker files are all present (most specific formats are listed first)."""
    present = set(filenames)
    for fmt in FORMATS:
        if all(m in present for m in fmt.marker):
            return fmt
    return None
