"""``python -m pipeline`` (or the ``geohier`` command): one entry point, one sub-command per
pipeline step.

Every command module has ``register(subparsers)``, which adds its parser and sets
``func(args, ws) -> int``. Errors a user can cause are GeohierError (or an OSError on a
path they gave) and end as ``error: <one line>`` with exit status 2; no traceback.

Only the module of the command being run is imported (``COMMANDS`` names each command's
module and its one-line help, so ``--help`` lists every command without importing any):
``--help``, ``score``, ``coverage``, ``labels``, ``merge``, ``import-*`` and ``fetch`` start
without torch (tests/test_cli_startup.py; figures in bench/startup.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from geohier.errors import GeohierError

# The modules whose commands the CLI offers (tests narrow it to one).
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

# Every command: (module, its --help line), in the order of --help. The help line must be the
# one the module's register() gives (tests/test_cli_startup.py checks it).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pipeline.demo", "build the synthetic demo world (no token, no internet)"),
    "import-photos": ("pipeline.ingest", "import a folder of geotagged photos (GPS from EXIF)"),
    "import-csv": ("pipeline.ingest",
                   "import images listed in a CSV with their coordinates (OSV-5M, Im2GPS3k, ...)"),
    "import-wds": ("pipeline.ingest",
                   "import WebDataset shards (osv5m-wds, PLONK): tars of jpg + json per sample"),
    "fetch": ("pipeline.fetch", "fetch street-level images from the Mapillary API v4"),
    "merge": ("pipeline.merge", "combine other workspaces (e.g. sharded fetches) into this one"),
    "coverage": ("pipeline.coverage", "coverage status per cell: ocean / land / land with images"),
    "labels": ("pipeline.labels", "build hierarchy.json (classes per level) and the train/val/test splits"),
    "embed": ("pipeline.embed", "embed the workspace's images with a frozen backbone (the embedding cache)"),
    "train": ("pipeline.train", "train a model (one backbone, a head per level)"),
    "evaluate": ("pipeline.evaluate", "calibrate and evaluate a trained run (writes the run's eval report)"),
    "score": ("pipeline.score", "score other systems' predictions on a truth set (OSV-5M protocol)"),
    "predict": ("pipeline.predict", "predict where photos were taken (hierarchical, level by level)"),
    "quickstart": ("pipeline.quickstart",
                   "build the demo world, labels and demo model where missing (make run)"),
}
PROG = "python -m pipeline"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as argparse does, but with the hint
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def command_of(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not a global option or its
    value), or None (``--help``, no command, an unknown one).

    >>> command_of(["--data", "d", "score", "p.csv"]), command_of(["--models=m", "--help"])
    ('score', None)
    """
    it = iter(argv)
    for word in it:
        if word in ("--data", "--models"):
            next(it, None)
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = "*", prog: str = PROG) -> argparse.ArgumentParser:
    """The CLI's parser. Only ``command``'s module is imported and registers its full
    parser(s); the other commands get a stub with their help line (enough for ``--help``).
    ``command="*"`` (the default) imports and registers every command's module."""
    parser = _Parser(prog=prog,
                     description="geohier's pipeline: from photos to a trained, evaluated, predicting run.")
    parser.add_argument("--data", default=None,
                        help="data directory (default: $GEOHIER_DATA or data/)")
    parser.add_argument("--models", default=None,
                        help="models directory (default: $GEOHIER_MODELS or models/)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module, helptext) in COMMANDS.items():
        if module not in COMMAND_MODULES or name in sub.choices:
            continue
        if command == "*" or COMMANDS.get(command, ("",))[0] == module:
            importlib.import_module(module).register(sub)  # adds all of the module's commands
        else:
            sub.add_parser(name, help=helptext, add_help=False)
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
    """Run one command; returns its exit status (the ``geohier`` console script exits with it)."""
    if argv is None:
        argv = sys.argv[1:]
        prog = "geohier" if os.path.basename(sys.argv[0] or "") == "geohier" else PROG
    else:
        prog = PROG
    argv = list(argv)
    parser = build_parser(command_of(argv), prog=prog)
    args = parser.parse_args(argv)
    from geohier.workspace import Workspace  # pandas: not for --help

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
