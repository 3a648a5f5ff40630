"""``python -m pipeline``: one entry point, one sub-command per pipeline step.

Every command module has ``register(subparsers)``, which adds its parser and sets
``func(args, ws) -> int``. Errors a user can cause are GeohierError (or an OSError on a
path they gave) and end as ``error: <one line>`` with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from geohier.errors import GeohierError
from geohier.workspace import Workspace

# Order here is the order of --help.
COMMAND_MODULES = (
    "pipeline.demo",
    "pipeline.ingest",
    "pipeline.fetch",
    "pipeline.merge",
    "pipeline.coverage",
    "pipeline.labels",
    "pipeline.embed",
    "pipeline.train",
    "pipeline.evaluate",
    "pipeline.score",
    "pipeline.predict",
    "pipeline.quickstart",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as argparse does, but with the hint
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline",
                     description="geohier's pipeline: from photos to a trained, evaluated, predicting run.")
    parser.add_argument("--data", default=None,
                        help="data directory (default: $GEOHIER_DATA or data/)")
    parser.add_argument("--models", default=None,
                        help="models directory (default: $GEOHIER_MODELS or models/)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def usage_markdown(width: int = 100) -> str:
    """The README's CLI section: every command's usage, as argparse prints it."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps usage to the terminal width
    try:
        parser = build_parser()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        blocks = [parser.format_usage().strip()]
        for name, sub in subparsers.choices.items():
            helptext = next(c.help for c in subparsers._choices_actions if c.dest == name)
            blocks.append(f"# {helptext}\n{sub.format_usage().strip()}")
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    text = "\n\n".join(blocks).replace("usage: ", "")
    # continuation lines were indented under "usage: ", which is gone
    text = "\n".join(line[7:] if line.startswith(" " * 8) else line for line in text.splitlines())
    return "```\n" + text + "\n```"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ws = Workspace.from_env(args.data, args.models)
    try:
        return int(args.func(args, ws) or 0)
    except GeohierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head` closed our stdout: not an error worth a line
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the exit flush does not fail again
        except OSError:
            pass
        return 141
    except OSError as exc:  # a path the user gave: missing, unreadable, disk full
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
