"""Tiny MovieLens datasets written on the fly, in every published layout, with the counts a loader must find.

One small catalogue (8 movies, 6 users, 30 ratings between 1997 and 2020, 4 tags) is written as a CSV variant
(ml-latest-small and friends), ml-100k, ml-1m or ml-10m. Bad rows are injected through the writers' ``extra_*``
arguments (raw field values, written as they are) or by the post-hoc helpers at the end of the module.
"""

from __future__ import annotations

import csv
import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)

# (movie_id, title, genres as ml-latest spells them); "Misérables" needs Latin-1 in ml-100k / ml-1m,
# "Usual Suspects, The" needs quoting in CSV, 8606 has no genres, 1172 is never rated.
MOVIES = (
    (1, "Toy Story (1995)", ("Adventure", "Animation", "Children", "Comedy", "Fantasy")),
    (2, "Jumanji (1995)", ("Adventure", "Children", "Fantasy")),
    (32, "Twelve Monkeys (a.k.a. 12 Monkeys) (1995)", ("Mystery", "Sci-Fi", "Thriller")),
    (50, "Usual Suspects, The (1995)", ("Crime", "Mystery", "Thriller")),
    (73, "Misérables, Les (1995)", ("Drama", "War")),
    (260, "Star Wars: Episode IV - A New Hope (1977)", ("Action", "Adventure", "Sci-Fi")),
    (1172, "Cinema Paradiso (Nuovo cinema Paradiso) (1989)", ("Drama",)),
    (8606, "Pull My Daisy (1958)", ()),
)
UNRATED_MOVIE = 1172

# (user_id, movie_id, rating on the half-star grid, unix seconds); whole-star variants round halves up.
RATINGS = (
    (1, 1, 4.0, 964982703), (1, 50, 5.0, 964982931), (1, 260, 5.0, 964981680), (1, 32, 3.5, 964983250),
    (1, 73, 4.5, 964984100), (1, 8606, 3.0, 964985000),
    (2, 1, 3.0, 1445714835), (2, 2, 2.5, 1445714994), (2, 260, 4.5, 1445715142), (2, 32, 4.0, 1445715340),
    (3, 50, 4.0, 1306463578), (3, 260, 0.5, 1306464052), (3, 73, 3.0, 1306464296), (3, 2, 1.5, 1306464511),
    (4, 1, 5.0, 986935199), (4, 2, 3.0, 986935268), (4, 32, 2.0, 986935338), (4, 50, 4.0, 986935416),
    (4, 260, 4.0, 986935480), (4, 73, 3.5, 986935556),
    (5, 1, 4.0, 852076800), (5, 50, 4.5, 852077000), (5, 32, 3.0, 852077350), (5, 8606, 2.0, 852077700),
    (6, 1, 3.5, 1609372000), (6, 2, 4.0, 1609372100), (6, 50, 5.0, 1609372200), (6, 260, 4.5, 1609372300),
    (6, 73, 2.5, 1609372400), (6, 32, 3.5, 1609372500),
)

TAGS = (
    (2, 260, "sci-fi", 1445715200),
    (2, 32, "time travel", 1445715400),
    (5, 50, "twist ending", 852077100),
    (6, 1, "pixar, animation", 1609372050),  # a comma: quoted in CSV
)

LINKS = ((1, "0114709", "862"), (2, "0113497", "8844"), (32, "0114746", "63"), (50, "0114814", "629"),
         (73, "0113828", "48750"), (260, "0076759", "11"), (1172, "0095765", "11216"), (8606, "0053184", ""))

RATINGS_HEADER = ("userId", "movieId", "rating", "timestamp")


@dataclass(frozen=True)
class Written:
    """Where a dataset was written and what a loader must count in it."""

    folder: Path
    ratings: int
    users: int
    movies: int
    tags: int | None


def _whole(rating) -> float:
    return float(math.ceil(rating)) if isinstance(rating, float) else rating


def _users(rows) -> int:
    return len({str(r[0]) for r in rows if str(r[0]).strip().lstrip("-").isdigit()})


def _csv_text(header, rows, delimiter=",") -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_csv_variant(folder, *, ratings=RATINGS, extra_ratings=(), extra_movies=(), tags=True, links=True,
                      ratings_columns=RATINGS_HEADER, ratings_delimiter=",") -> Written:
    """ml-latest-small layout: ratings.csv, movies.csv (+ tags.csv, links.csv), UTF-8 with headers.

    ``extra_ratings`` / ``extra_movies`` are appended as raw field values (so ``"abc"`` or ``""`` go in as is);
    ``ratings_columns`` keeps only those columns of ratings.csv; ``ratings_delimiter`` mis-separates it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [*ratings, *extra_ratings]
    keep = [RATINGS_HEADER.index(c) for c in ratings_columns]
    (folder / "ratings.csv").write_text(
        _csv_text(ratings_columns, [[r[i] for i in keep] for r in rows], ratings_delimiter), encoding="utf-8")
    movies = [(m, t, "|".join(g) or "(no genres listed)") for m, t, g in MOVIES] + list(extra_movies)
    (folder / "movies.csv").write_text(_csv_text(("movieId", "title", "genres"), movies), encoding="utf-8")
    if tags:
        (folder / "tags.csv").write_text(_csv_text(("userId", "movieId", "tag", "timestamp"), TAGS), encoding="utf-8")
    if links:
        (folder / "links.csv").write_text(_csv_text(("movieId", "imdbId", "tmdbId"), LINKS), encoding="utf-8")
    return Written(folder, len(rows), _users(rows), len(movies), len(TAGS) if tags else None)


def write_100k(folder, *, extra_ratings=()) -> Written:
    """ml-100k layout: u.data (tab-separated, whole stars) and u.item ('|'-separated, Latin-1, 19 genre flags)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(u, m, int(_whole(r)), ts) for u, m, r, ts in RATINGS] + list(extra_ratings)
    (folder / "u.data").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="latin-1")
    lines = []
    for movie_id, title, genres in MOVIES:
        named = {"Children's" if g == "Children" else g for g in genres}
        flags = ["1" if (g in named or (g == "unknown" and not genres)) else "0" for g in GENRES_100K]
        url = "http://us.imdb.com/M/title-exact?" + title.replace(" ", "%20")
        lines.append("|".join([str(movie_id), title, "01-Jan-1995", "", url, *flags]) + "\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (folder / "u.user").write_text("".join(f"{u}|24|M|technician|85711\n" for u in range(1, 7)))
    return Written(folder, len(rows), _users(rows), len(MOVIES), None)


def _dat_movies(folder: Path, encoding: str, children: str) -> None:
    lines = []
    for movie_id, title, genres in MOVIES:
        named = [children if g == "Children" else g for g in genres]
        lines.append(f"{movie_id}::{title}::{'|'.join(named) or '(no genres listed)'}\n")
    (folder / "movies.dat").write_bytes("".join(lines).encode(encoding))


def write_1m(folder, *, extra_ratings=()) -> Written:
    """ml-1m layout: ratings.dat (whole stars), users.dat, movies.dat, '::'-separated, Latin-1 titles."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(u, m, int(_whole(r)), ts) for u, m, r, ts in RATINGS] + list(extra_ratings)
    (folder / "ratings.dat").write_text("".join("::".join(map(str, r)) + "\n" for r in rows))
    (folder / "users.dat").write_text("".join(f"{u}::F::25::{u}::48067\n" for u in range(1, 7)))
    _dat_movies(folder, "latin-1", "Children's")
    return Written(folder, len(rows), _users(rows), len(MOVIES), None)


def write_10m(folder, *, extra_ratings=()) -> Written:
    """ml-10m layout: ratings.dat (half stars), movies.dat, tags.dat, '::'-separated, no users.dat."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [*RATINGS, *extra_ratings]
    (folder / "ratings.dat").write_text("".join("::".join(map(str, r)) + "\n" for r in rows))
    _dat_movies(folder, "utf-8", "Children")
    (folder / "tags.dat").write_text("".join("::".join(map(str, t)) + "\n" for t in TAGS))
    return Written(folder, len(rows), _users(rows), len(MOVIES), len(TAGS))


# --- post-hoc damage and packaging ------------------------------------------------------------------------


def append_bytes(path, data: bytes) -> int:
    """Append raw bytes to a file; return the line number the appended data starts on."""
    path = Path(path)
    old = path.read_bytes()
    path.write_bytes(old + data)
    return old.count(b"\n") + 1


def truncate_last_row(path, keep: int = 2) -> int:
    """Cut the file's last row after ``keep`` characters (as a copy cut off mid-row); return its line number."""
    path = Path(path)
    lines = path.read_bytes().rstrip(b"\n").split(b"\n")
    lines[-1] = lines[-1][:keep]
    path.write_bytes(b"\n".join(lines))
    return len(lines)


def zip_folder(folder, zip_path, arcname: str | None = None) -> Path:
    """Zip a dataset folder the way GroupLens does: every file inside one top-level folder."""
    folder, zip_path = Path(folder), Path(zip_path)
    arcname = arcname or folder.name
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"{arcname}/{path.name}")
    return zip_path


def add_column(path, name: str, value) -> None:
    """Append a column to a CSV file with a header: ``name`` in the header, ``value(fields)`` on each row."""
    path = Path(path)
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    rows[0].append(name)
    for row in rows[1:]:
        row.append(str(value(row)))
    path.write_text(_csv_text(None, rows), encoding="utf-8")


def rename_header(path, old: str, new: str) -> None:
    """Rename one column in a CSV file's header line."""
    path = Path(path)
    header, rest = path.read_text(encoding="utf-8").split("\n", 1)
    names = header.split(",")
    names[names.index(old)] = new
    path.write_text(",".join(names) + "\n" + rest, encoding="utf-8")
