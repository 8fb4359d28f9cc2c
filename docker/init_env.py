#!/usr/bin/env python3
"""Write docker/.env from docker/.env.example, filling every empty secret with a fresh random value.

    python3 init_env.py [--example .env.example] [--output .env] [--force]

Only the standard library. Never overwrites an existing file unless --force; the file is created readable by
its owner only. The values are not printed: read them from the file (the Airflow admin password is
_AIRFLOW_WWW_USER_PASSWORD).
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fernet_key() -> str:
    """What cryptography's Fernet.generate_key() returns: urlsafe base64 of 32 random bytes."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


GENERATORS = {
    "AIRFLOW_JWT_SECRET": lambda: secrets.token_urlsafe(48),
    "AIRFLOW_API_SECRET_KEY": lambda: secrets.token_urlsafe(48),
    "AIRFLOW_FERNET_KEY": fernet_key,
    "_AIRFLOW_WWW_USER_PASSWORD": lambda: secrets.token_urlsafe(18),
    # URL-safe without '%', '@', ':' or '/': they go into database URLs unquoted
    "POSTGRES_PASSWORD": lambda: secrets.token_hex(24),
    "S3_SECRET_ACCESS_KEY": lambda: secrets.token_hex(24),
}


def render(example: str) -> str:
    """The example's text with each empty generated variable given a value; everything else unchanged."""
    out = []
    for line in example.splitlines(keepends=True):
        name, sep, value = line.rstrip("\n").partition("=")
        if sep and not line.lstrip().startswith("#") and name.strip() in GENERATORS and not value.strip():
            line = f"{name.strip()}={GENERATORS[name.strip()]()}\n"
        out.append(line)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=Path, default=HERE / ".env.example")
    parser.add_argument("--output", type=Path, default=HERE / ".env")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.force:
        print(f"{args.output} exists; keeping it (--force replaces it, and its secrets)", file=sys.stderr)
        return 1
    text = render(args.example.read_text())
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(args.output, 0o600)
    print(f"wrote {args.output} (secrets generated: {', '.join(GENERATORS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
