"""``python -m pipeline train``: the flags, derived from TrainConfig's fields, and the command.

Each field of ``pipeline.train.config.TrainConfig`` is one flag (``image_size`` ->
``--image-size``) with the field's help and default; two more are the command's own:
``--preset demo`` (start from ``demo_config``; flags given explicitly still apply) and
``--resume RUN_DIR``. A bad value ends as one ``error:`` line (exit status 2) naming
every bad flag, from the same validator the Train page uses.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from geohier.runs import Run
from geohier.workspace import Workspace
from pipeline.train.config import TrainConfig, config_fields, demo_config, flag, help_text, parse_value
from pipeline.train.distributed import env_rank
from pipeline.train.fit import RESUME_OVERRIDES, resume, train_runs

PRESETS = {"demo": demo_config}


def add_config_arguments(p: argparse.ArgumentParser, after: dict | None = None) -> None:
    """One flag per TrainConfig field. Every default is None ("not given"), so that a
    preset, or the stored config of a resumed run, fills what the command line left out.
    ``after``: {field name: add(p)} adds other flags after that field's (the order of
    --help and of the README's usage line)."""
    after = after or {}
    for f in config_fields(cli=True):
        m = f.metadata
        kind, kw = m["kind"], {"default": None, "help": help_text(f)}
        if m["metavar"]:
            kw["metavar"] = m["metavar"]
        if kind == "bool":
            p.add_argument(flag(f.name), action="store_true", **kw)
        elif kind == "tristate":
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif kind in ("int", "float"):
            p.add_argument(flag(f.name), type=int if kind == "int" else float, **kw)
        else:
            p.add_argument(flag(f.name), **kw)
        if f.name in after:
            after[f.name](p)


def get_args_parser(add_help: bool = True, parser: argparse.ArgumentParser | None = None):
    p = parser or argparse.ArgumentParser(description="Train a multi-level geolocation classifier",
                                          add_help=add_help)
    add_config_arguments(p, after={"weights": _add_preset, "run_name": _add_resume})
    return p


def _add_preset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a preset configuration (demo: resnet18 at 64 px, a few minutes on a CPU); "
                        "other flags given explicitly still apply")


def _add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue this run from its last saved epoch (--epochs may extend it)")


def config_from_args(args) -> TrainConfig:
    """The TrainConfig of parsed flags: the preset's (or the default) values, replaced by
    every flag given."""
    base = PRESETS[args.preset]() if getattr(args, "preset", None) else TrainConfig()
    given = {}
    for f in config_fields(cli=True):
        v = getattr(args, f.name, None)
        if v is not None:
            given[f.name] = parse_value(f, v, levels=given.get("levels", base.levels))
    return replace(base, **given)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (one backbone, a head per level)",
                       description="Train a multi-level geolocation classifier: one backbone and a linear head "
                                   "per grid level (or, with --per-level, one run per level). Runs under "
                                   "torchrun too.")
    get_args_parser(parser=p)
    p.set_defaults(func=run)


def run(args, ws: Workspace) -> int:
    if args.resume:
        dirs = resume(ws, args.resume, **{k: getattr(args, k, None) for k in RESUME_OVERRIDES})
    else:
        dirs = train_runs(ws, config_from_args(args))
    states = [Run(d).status().get("state") for d in dirs]
    if env_rank() == 0:
        for d, s in zip(dirs, states, strict=True):
            print(f"{s}: {d}")
    return 130 if "cancelled" in states else 0


def main(args) -> int:
    """torchvision-style entry: ``main(get_args_parser().parse_args())`` with the default workspace.

    Errors a user can fix end as one ``error:`` line with exit status 2, as under
    ``python -m pipeline``."""
    from geohier.errors import GeohierError

    try:
        return run(args, Workspace.from_env())
    except GeohierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
