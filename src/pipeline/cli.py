"""``recsys``: run the pipeline's stages in-process, with the same Params the DAG has.

    recsys run --source SRC --work-dir DIR [--stages a,b,...] [--param NAME=VALUE ...]
               [--side-by-side | --one-at-a-time]
    recsys params [--json | --markdown]
    recsys settings
    recsys synth --ratings N --users U --movies M --out DIR [--seed S]
    recsys similar --movie TITLE_OR_ID [-k 10] [--metric cosine|euclidean|lsh] [--json]
    recsys recommend (--user ID | --ratings "ID:RATING,..." | --popular) [-k 10] [--genres G1,G2] [--json]

``similar`` and ``recommend`` read the served tables (``<data_root>/serving/current``) with pandas only:
no Spark, TensorFlow or MLflow is imported, so they answer in about a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline import __version__, storage
from pipeline.config import mask_secrets
from pipeline.errors import RecsysError
from pipeline.params import JAVA_INT_MAX, PARAMS, SECTIONS, parse_cli_params, resolve_params
from pipeline.similarity import METRICS as SIMILARITY_METRICS


def _cmd_run(args) -> int:
    from pipeline import report, stages
    from pipeline.config import load_settings

    params = parse_cli_params(args.param)
    if args.source:
        params["source"] = args.source
    params = resolve_params(params)  # every Param checked before any folder is made
    names = stages.parse_stages(args.stages)
    settings = load_settings()
    work_dir = Path(args.work_dir).resolve() if args.work_dir else None
    for what, folder in (("--work-dir", work_dir), ("the home folder (RECSYS_HOME)", settings.home),
                         ("the data root (RECSYS_DATA_ROOT)", settings.data_root),
                         ("the cache folder (RECSYS_CACHE_DIR)", settings.cache_dir)):
        if folder is not None:  # checked before any stage writes, so a bad path is a bad argument, not a crash
            storage.writable_dir(folder, what)
    run_id = args.run_id
    if run_id is None and work_dir and "ingest" not in names and (work_dir / report.REPORT).exists():
        run_id = _report_run_id(work_dir / report.REPORT)  # continue that run
    ctx = stages.make_context(run_id=run_id, work_dir=work_dir, params=params, settings=settings)
    # a run from ingest on starts a fresh report: the earlier one is dropped once ingest has succeeded
    concurrent = True if args.side_by_side else False if args.one_at_a_time else None  # None: by the cores
    result = stages.run_pipeline(ctx, names, fresh="ingest" in names, concurrent=concurrent)
    print(json.dumps({"report": str(ctx.run_dir / report.REPORT), "run_id": ctx.run_id,
                      "timings_s": result.get("timings_s", {})}, indent=2))
    return 0


def _report_run_id(path: Path) -> str | None:
    from pipeline.errors import StageError

    try:
        data = storage.read_json(path)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot be read to continue its run ({exc}); give --run-id, or run from ingest "
                         f"to start the folder afresh") from exc
    return data.get("run_id") if isinstance(data, dict) else None


def _cmd_params(args) -> int:
    if args.markdown:  # docs/params.md
        from pipeline.reference_docs import params_markdown

        print(params_markdown(), end="")
        return 0
    if args.json:
        print(json.dumps([{"name": p.name, "default": p.default, "section": p.section,
                           "description": p.description, **p.json_schema()} for p in PARAMS], indent=2))
        return 0
    for section in SECTIONS:
        print(f"[{section}]")
        for p in (p for p in PARAMS if p.section == section):
            kind = p.type + (" or null" if p.nullable else "")
            print(f"{p.name} = {json.dumps(p.default)}  ({kind}{', one of ' + str(list(p.enum)) if p.enum else ''})")
            print(f"    {p.description}")
    return 0


def _cmd_settings(args) -> int:
    from pipeline.config import load_settings

    print(json.dumps(load_settings().public_dict(), indent=2))
    return 0


def _cmd_synth(args) -> int:
    from pipeline.data.synth import write_synthetic

    print(json.dumps(write_synthetic(Path(args.out), args.ratings, args.users, args.movies, seed=args.seed),
                     indent=2))
    return 0


def _print_query_result(frame, args, score_label: str = "score") -> None:
    from pipeline.serving.query import format_table

    for note in frame.attrs.get("notes", []):  # a cap or a filter that changed what was asked for
        print(f"recsys: note: {note}", file=sys.stderr)
    if args.json:
        text = storage.strict_json(frame.to_dict("records"), indent=2)
    else:
        text = format_table(frame, score_label)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `recsys recommend ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _cmd_similar(args) -> int:
    from pipeline.config import load_settings
    from pipeline.serving.query import similar_to_title
    from pipeline.serving.served import open_served

    served = open_served(load_settings().serving_dir)
    frame = similar_to_title(served, args.movie, args.k, args.metric)
    _print_query_result(frame, args, "distance" if args.metric == "euclidean" else "similarity")
    return 0


def _cmd_recommend(args) -> int:
    from pipeline.config import load_settings
    from pipeline.serving import query
    from pipeline.serving.served import open_served

    served = open_served(load_settings().serving_dir)
    if args.user is not None:
        frame = query.recommend_user(served, args.user, args.k, args.genres)
    elif args.ratings is not None:
        frame = query.recommend_ratings(served, args.ratings, args.k, args.genres, args.metric)
    else:
        frame = query.recommend_popular(served, args.k, args.genres)
    _print_query_result(frame, args)
    return 0


MAX_K = 1_000_000  # results per query: the served lists are far shorter; a bigger k is a typo
MAX_SYNTH = 1_000_000_000  # ratings, users or movies of a synthetic dataset (ml-32m has 32 M ratings)


def _count(maximum: int, minimum: int = 1):
    """An argparse type: a whole number in ASCII digits within [minimum, maximum] (``int()`` alone also reads
    "\u0661" as 1 and takes any size)."""

    def parse(text: str) -> int:
        typed = text.strip()
        if not (typed.isascii() and typed.isdigit()) or not minimum <= int(typed) <= maximum:
            raise argparse.ArgumentTypeError(f"expected a whole number from {minimum} to {maximum} in the digits "
                                             f"0-9, got {text!r}")
        return int(typed)

    parse.__name__ = "count"
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line form of every other error: ``recsys: error: ...``, exit 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        command = self.prog.removeprefix("recsys").strip()
        print(f"recsys: error: {command + ': ' if command else ''}{message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recsys", description="MovieLens recommender pipeline")
    parser.add_argument("--version", action="version", version=f"recsys {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run stages in this process and write <work-dir>/report.json")
    run.add_argument("--source", help="grouplens:<name>, a local folder or .zip, or s3://bucket/prefix "
                                      "(default: RECSYS_SOURCE / MOVIELENS_DIR / grouplens:ml-latest-small)")
    run.add_argument("--work-dir", help="the run folder (default: <data_root>/runs/<run_id>)")
    run.add_argument("--stages", help="comma-separated stages to run (default: all, in pipeline order)")
    order = run.add_mutually_exclusive_group()
    order.add_argument("--side-by-side", action="store_true",
                       help="a Spark stage beside a Python stage, each once the chosen stages it depends on are "
                            "done (the default with 4 cores or more)")
    order.add_argument("--one-at-a-time", action="store_true",
                       help="the stages one after another in pipeline order (the default below 4 cores)")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="override a Param; VALUE is JSON (see `recsys params`)")
    run.add_argument("--run-id", help="run id (default: a new one, or the work dir's when continuing)")
    run.set_defaults(func=_cmd_run)

    params = sub.add_parser("params", help="list the Params with defaults and descriptions")
    shape = params.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="a JSON list: each Param's default, section, description "
                                                           "and JSON schema")
    shape.add_argument("--markdown", action="store_true", help="the reference page docs/params.md")
    params.set_defaults(func=_cmd_params)

    settings = sub.add_parser("settings", help="print the effective settings")
    settings.set_defaults(func=_cmd_settings)

    synth = sub.add_parser("synth", help="write a synthetic MovieLens-CSV folder (power-law popularity and "
                                         "activity, a planted low-rank taste structure)")
    synth.add_argument("--ratings", type=_count(MAX_SYNTH), required=True,
                       help="how many ratings (about: heavy users may fall a few short)")
    synth.add_argument("--users", type=_count(MAX_SYNTH), required=True)
    synth.add_argument("--movies", type=_count(MAX_SYNTH), required=True)
    synth.add_argument("--out", required=True, help="the folder to write (a new one, or an earlier synth folder)")
    synth.add_argument("--seed", type=_count(JAVA_INT_MAX, minimum=0), default=42,
                       help="same seed and sizes, same files (default 42)")
    synth.set_defaults(func=_cmd_synth)

    similar = sub.add_parser("similar", help="movies similar to one movie, from the served tables")
    similar.add_argument("--movie", required=True, metavar="TITLE_OR_ID",
                         help='a title as in the catalog, e.g. "Toy Story (1995)", or a movie id')
    similar.add_argument("-k", type=_count(MAX_K), default=10, help="how many (default 10)")
    similar.add_argument("--metric", choices=SIMILARITY_METRICS, default="cosine",
                         help="similarity table to read (default cosine)")
    similar.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    similar.set_defaults(func=_cmd_similar)

    rec = sub.add_parser("recommend", help="recommendations for a known user, a new user's ratings, or anyone")
    who = rec.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="ID", help="a user the model knows")  # checked by query.ascii_id
    who.add_argument("--ratings", metavar='"ID:RATING,..."',
                     help='a new user\'s ratings, e.g. "1:5,260:4.5" (item-based cold start)')
    who.add_argument("--popular", action="store_true", help="popular movies (a user with no ratings)")
    rec.add_argument("-k", type=_count(MAX_K), default=10, help="how many (default 10)")
    rec.add_argument("--genres", metavar="G1,G2", help="only movies of any of these genres (case-insensitive)")
    rec.add_argument("--metric", choices=SIMILARITY_METRICS, default="cosine",
                     help="similarity table used for --ratings (default cosine)")
    rec.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    rec.set_defaults(func=_cmd_recommend)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a bad argument (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("py4j", "great_expectations", "urllib3", "botocore", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_mask_secrets_filter)
    try:
        return args.func(args)
    except RecsysError as exc:
        print(f"recsys: error: {mask_secrets(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("recsys: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # not a user error: the machine's (disk full), else a bug: show where, and say so
        from pipeline.services import machine_error

        machine = machine_error(exc)
        if machine is not None:
            print(f"recsys: error: {mask_secrets(str(machine))}", file=sys.stderr)
            return machine.exit_code
        import traceback

        traceback.print_exc()
        print(f"recsys: internal error (a bug, please report it with the traceback above): "
              f"{type(exc).__name__}: {mask_secrets(str(exc))}", file=sys.stderr)
        return 1


def _mask_secrets_filter(record: logging.LogRecord) -> bool:
    """Passwords inside URIs never reach a log line (e.g. a tracking URI quoted in an error)."""
    message = record.getMessage()
    masked = mask_secrets(message)
    if masked != message:
        record.msg, record.args = masked, None
    return True


if __name__ == "__main__":
    sys.exit(main())
