"""Where a dataset comes from: ``grouplens:<name>`` (downloaded once into the cache, checksum-verified), a local
folder or .zip (members checked before anything is extracted), or ``s3://bucket/prefix`` (through boto3).
``resolve_source`` turns any of them into a local folder holding a known MovieLens format (``ingest`` reads it).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from pipeline import storage
from pipeline.data.formats import FORMATS, detect_format
from pipeline.errors import SourceError

VARIANT_NAME = re.compile(r"^ml-[A-Za-z0-9-]+$")


def _find_dataset_dir(root: Path) -> Path:
    """``root`` itself, or its single sub-folder, whichever holds a known MovieLens format."""
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for candidate in candidates:
        if detect_format(p.name for p in candidate.iterdir() if p.is_file()):
            return candidate
    known = ", ".join("+".join(f.marker) for f in FORMATS)
    found = sorted(p.name for p in root.iterdir())[:20]
    raise SourceError(f"{root}: no MovieLens ratings file found (looked for {known}); the folder holds {found}")


# Limits on what a zip may expand to: ml-32m, the largest MovieLens, is ~1.2 GB unzipped at a ratio ~4;
# a member beyond them is a damaged archive or a zip bomb, refused before anything is written.
MAX_UNZIPPED_BYTES = 4 * 2**30
MAX_ZIP_RATIO = 100
_RATIO_FLOOR = 2**20  # members below 1 MiB may compress as well as they like


def _check_zip_members(zip_path: Path, zf: zipfile.ZipFile) -> None:
    total = 0
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or ".." in PurePosixPath(name).parts or name[1:2] == ":":
            # zipfile would extract it inside the folder anyway; an archive made like that is not a dataset
            raise SourceError(f"{zip_path}: member {info.filename} points outside the archive's folder: not "
                              "extracted (a damaged or hostile archive)")
        total += info.file_size
        if info.file_size > _RATIO_FLOOR and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            raise SourceError(f"{zip_path}: member {info.filename} expands {ratio:.0f}"
                              f"-fold ({info.file_size} bytes), beyond the limit of {MAX_ZIP_RATIO}: not extracted "
                              f"(a damaged archive or a zip bomb)")
    if total > MAX_UNZIPPED_BYTES:
        raise SourceError(f"{zip_path}: its members add up to {total} bytes unzipped, beyond the limit of "
                          f"{MAX_UNZIPPED_BYTES} bytes: not extracted")


def _extract_zip(zip_path: Path, dest: Path) -> Path:
    if not dest.exists():
        try:
            with zipfile.ZipFile(zip_path) as zf:
                _check_zip_members(zip_path, zf)  # zipfile stops each member at its declared size
                with storage.atomic_dir(dest) as tmp:
                    zf.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise SourceError(f"{zip_path}: not a valid zip archive ({exc})") from exc
    return _find_dataset_dir(dest)


def _http_get(url: str, dest: Path) -> None:
    tmp = dest.with_name(f".tmp-{dest.name}")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out)
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise SourceError(f"cannot download {url}: {exc}") from exc
    tmp.replace(dest)


def fetch_grouplens(name: str, settings) -> Path:
    """Download ``<grouplens_url>/<name>.zip`` into the cache once, verify its MD5, and extract it."""
    if not VARIANT_NAME.match(name):
        raise SourceError(f"grouplens:{name}: not a MovieLens dataset name (expected e.g. ml-latest-small)")
    cache = settings.cache_dir / "grouplens"
    cache.mkdir(parents=True, exist_ok=True)
    zip_path = cache / f"{name}.zip"
    verified = cache / f"{name}.zip.sha256"
    if not (zip_path.exists() and verified.exists() and verified.read_text().strip() == storage.file_sha256(zip_path)):
        base = settings.grouplens_url.rstrip("/")
        md5_path = cache / f"{name}.zip.md5"
        _http_get(f"{base}/{name}.zip.md5", md5_path)
        match = re.search(r"\b[0-9a-fA-F]{32}\b", md5_path.read_text(errors="replace"))
        if not match:
            raise SourceError(f"{base}/{name}.zip.md5 holds no MD5 checksum")
        _http_get(f"{base}/{name}.zip", zip_path)
        actual = hashlib.md5(zip_path.read_bytes()).hexdigest()
        if actual != match.group(0).lower():
            zip_path.unlink()
            raise SourceError(
                f"{base}/{name}.zip: checksum mismatch (MD5 {actual}, published {match.group(0).lower()}); "
                "the download was discarded"
            )
        verified.write_text(storage.file_sha256(zip_path))
        shutil.rmtree(cache / name, ignore_errors=True)
    return _extract_zip(zip_path, cache / name)


def resolve_source(source: str, settings) -> tuple[Path, str]:
    """A local folder holding the dataset files, and the variant's name."""
    if source.startswith("grouplens:"):
        name = source.split(":", 1)[1]
        return fetch_grouplens(name, settings), name
    if source.startswith("s3://"):
        bucket, prefix = storage.parse_s3_uri(source)
        dest = settings.cache_dir / "s3" / bucket / (prefix or "_root")
        folder = dest.parent / f".fetch-{dest.name}"
        storage.download_s3_prefix(source, folder, settings)
        if dest.exists():
            shutil.rmtree(dest)
        folder.rename(dest)
        name = prefix.rsplit("/", 1)[-1] if prefix else bucket
        return _find_dataset_dir(dest), name
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"dataset source {source!r} does not exist (expected a folder, a .zip, "
                          "grouplens:<name> or s3://bucket/prefix)")
    if path.is_file() and path.suffix.lower() == ".zip":
        dest = settings.cache_dir / "zips" / f"{path.stem}-{storage.file_sha256(path)[:12]}"
        return _extract_zip(path, dest), path.stem
    if not path.is_dir():
        raise SourceError(f"dataset source {source!r} is a file, not a dataset: expected the folder holding "
                          f"the MovieLens files (e.g. ratings.csv), a .zip, grouplens:<name> or s3://bucket/prefix")
    folder = _find_dataset_dir(path)
    return folder, folder.name
