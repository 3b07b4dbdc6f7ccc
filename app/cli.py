"""`pdserve` command line: build the default model (more subcommands join as they land)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "pdserve-tiny-llama"


def _build_model(args: argparse.Namespace) -> None:
    from app.tiny_model import build_tiny_model

    build_tiny_model(Path(args.out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-model", help="rebuild the default tiny model from the stdlib sources")
    build.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="output directory")
    build.set_defaults(func=_build_model)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
