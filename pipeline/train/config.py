"""The one training configuration: ``TrainConfig``, its validator, and its command line.

Every training parameter is declared once, as a field of ``TrainConfig`` whose metadata
says how people meet it: its help text, its bounds or choices, the flag that sets it, and
the label of the Train page's widget when the page shows it. From those fields come

- ``python -m pipeline train``'s flags (``pipeline.train.cli`` adds one per field),
- the background job's argv (``to_argv``, the exact inverse of ``config_from_args``),
- the Train page's form (the fields with a ``page`` label), and
- ``validate``: {field: message} for every unusable value, shown by the CLI as one
  ``error:`` line and by the page next to each widget.

The largest image size is 2048 px: the command line accepted that before the page and the
job launcher had their own (1024, 4096) limits, it is above every backbone's native
resolution (EfficientNet-B7's 600 px, a high-resolution ViT's 518 px) with room for crops
of large panoramas, and beyond it a single image's activations fill a typical GPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path

from geohier import grid
from geohier.backbones import SPEC_HELP, check_backbone, short_name
from geohier.errors import GeohierError, InputError
from geohier.forward import DEVICE_HELP, resolve_device
from geohier.model import DEFAULT_BACKBONE, HEADS, LOSSES

MAX_IMAGE_SIZE = 2048
WEIGHT_CHOICES = ("imagenet", "pretrained", "none")
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
RUN_NAME_HELP = "use letters, digits, '.', '_' or '-' (at most 80)"


def _opt(default, kind: str, help: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
         metavar: str | None = None, page: dict | None = None, cli: bool = True, resume: bool = False,
         shown_default: str | None = None, choices: tuple | None = None):
    """A TrainConfig field. ``kind``: int, float, str, bool (a switch), tristate (--x/--no-x,
    None = automatic), levels ("1,3,5,8") or level_weights ("1:1,8:0.5"). ``lo``/``hi``:
    bounds (``*_open``: excluded); ``page``: the Train page's widget (label, step, format,
    help) when the page shows the field; ``resume``: ``--resume`` may change it;
    ``choices``: the values a str field takes (the page shows a select box)."""
    meta = {"kind": kind, "help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "metavar": metavar, "page": page, "cli": cli, "resume": resume, "shown_default": shown_default,
            "choices": tuple(choices) if choices else None}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a run depends on; stored as the run's config (``to_dict``)."""

    levels: list[int] | None = _opt(
        None, "levels", "comma-separated grid levels to train", shown_default="every level of hierarchy.json",
        page={"label": "Levels", "help": "grid levels to classify (those of hierarchy.json)"})
    per_level: bool = _opt(
        False, "bool", "the seed's shape: one model (run) per level instead of one shared backbone",
        page={"label": "Shape", "help": "one backbone with a head per level, or one model per level"})
    backbone: str = _opt(
        DEFAULT_BACKBONE, "str", f"backbone spec: {SPEC_HELP}", metavar="SPEC",
        page={"label": "Backbone"})
    weights: str = _opt(
        "imagenet", "str", "initial backbone weights: imagenet (a foundation spec: its own weights, also "
        "'pretrained'), none or a .safetensors file",
        page={"label": "Weights", "help": "imagenet downloads torchvision's weights once (needs the internet); "
              "for hf:/open_clip:/timm: specs it means the model's own pretrained weights"})
    frozen: bool = _opt(
        False, "bool", "freeze the backbone: embed every image once into the workspace's embedding cache, "
        "then train only the level heads on the cached features (no augmentation)",
        page={"label": "Frozen backbone (heads on cached embeddings)",
              "help": "embeds each image once (reused by later runs with the same backbone); an epoch then "
                      "takes seconds"})
    epochs: int = _opt(10, "int", "epochs", lo=1, hi=10_000, resume=True, page={"label": "Epochs", "step": 1})
    batch_size: int = _opt(64, "int", "images per step and process", lo=1, hi=65_536,
                           page={"label": "Batch size", "step": 8})
    lr: float = _opt(5e-4, "float", "peak AdamW learning rate", lo=0.0, hi=10.0, lo_open=True,
                     page={"label": "Learning rate", "step": 1e-4, "format": "%.5f"})
    weight_decay: float = _opt(0.05, "float", "AdamW weight decay", lo=0.0, hi=10.0)
    warmup_epochs: float = _opt(1.0, "float", "linear warm-up length before the cosine decay", lo=0.0, hi=10_000.0)
    image_size: int = _opt(224, "int", "input size in px", lo=16, hi=MAX_IMAGE_SIZE,
                           page={"label": "Image size (px)", "step": 16})
    label_smoothing: float = _opt(0.1, "float", "uniform label smoothing", lo=0.0, hi=1.0, hi_open=True,
                                  page={"label": "Label smoothing", "step": 0.05, "format": "%.2f"})
    haversine_tau: float = _opt(
        0.0, "float", "PIGEON haversine label smoothing scale in km, 0 = off", lo=0.0, hi=20_000.0, metavar="KM",
        page={"label": "Haversine smoothing tau (km, 0 = off)", "step": 25.0,
              "help": "PIGEON's label smoothing over nearby cells"})
    level_weights: dict[int, float] | None = _opt(
        None, "level_weights", "loss weight per level, LEVEL:W pairs (1:1,8:0.5) or one per level",
        shown_default="1 each")
    head: str = _opt(
        "cell", "str", "the model's head: cell (classes; the guess is the cell's point) or hybrid (classes "
        "and the image's offset inside its finest cell; the guess is the cell's point moved by it)",
        choices=HEADS, metavar="{" + ",".join(HEADS) + "}",
        page={"label": "Head", "help": "hybrid also regresses where in its cell the image is (OSV-5M's hybrid head)"})
    offset_weight: float = _opt(1.0, "float", "weight of the hybrid head's offset loss (L1, true class only)",
                                lo=0.0, hi=1000.0, page={"label": "Offset loss weight (hybrid head)", "step": 0.5,
                                                         "format": "%.2f"})
    loss: str = _opt(
        "independent", "str", "independent (one softmax per level) or hierarchical (one softmax over the "
        "class tree's leaves summed into every level, NLL at each: OSV-5M's hierarchical loss)",
        choices=LOSSES, metavar="{" + ",".join(LOSSES) + "}",
        page={"label": "Loss", "help": "hierarchical: one softmax over the finest classes (and coarser classes "
                                      "without finer ones); each level's probabilities are its sums"})
    balanced: bool = _opt(False, "bool", "class-balanced sampling at the finest level",
                          page={"label": "Class-balanced sampling"})
    randaugment: bool = _opt(False, "bool", "add RandAugment to the train transforms")
    # off by default: a mirrored street swaps the driving side
    hflip: float = _opt(0.0, "float", "horizontal flip probability; flips swap the driving side", lo=0.0, hi=1.0)
    mixup: float = _opt(0.0, "float", "MixUp Beta alpha, 0 = off", lo=0.0, metavar="ALPHA")
    cutmix: float = _opt(0.0, "float", "CutMix Beta alpha, 0 = off", lo=0.0, metavar="ALPHA")
    # no flag yet (the command never had one); a stored run config or a caller may set it
    head_dropout: float = _opt(0.0, "float", "dropout before each level's head", lo=0.0, hi=1.0, hi_open=True,
                               cli=False)
    workers: int = _opt(2, "int", "data-loading processes", lo=0, hi=256, resume=True)
    threads: int | None = _opt(None, "int", "CPU compute threads per process", lo=1, hi=1024, resume=True,
                               shown_default="cores / processes, less one when loader workers run")
    seed: int = _opt(0, "int", "random seed", lo=0, hi=2**32 - 1)
    device: str = _opt("auto", "str", DEVICE_HELP, resume=True)
    amp: bool | None = _opt(None, "tristate", "mixed precision", shown_default="on with CUDA, off on CPU")
    run_name: str | None = _opt(
        None, "str", "run directory name under models/", shown_default="<backbone>-L<levels>-<time>",
        page={"label": "Run name (optional)", "help": "folder name under models/; default: backbone + time"})
    group: str | None = _opt(None, "str", "the per-level set this run belongs to", cli=False)
    max_steps: int | None = _opt(None, "int", "stop each epoch after N steps", lo=1, resume=True,
                                 shown_default="whole epoch")
    limit_train: int | None = _opt(None, "int", "train on a random subset of N images", lo=1, metavar="N",
                                   shown_default="all")
    limit_val: int | None = _opt(None, "int", "validate on N images", lo=0, metavar="N", shown_default="all")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.level_weights is not None:
            d["level_weights"] = {str(k): float(v) for k, v in self.level_weights.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config of a stored run config (keys it does not know are ignored)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("level_weights"):
            kw["level_weights"] = {int(k): float(v) for k, v in kw["level_weights"].items()}
        return cls(**kw)

    def validate(self, available_levels=None) -> None:
        """Raise InputError naming every unusable value (``validate`` says which)."""
        errors = validate(self, available_levels)
        if errors:
            raise InputError(format_errors(errors))


# ----------------------------------------------------------------------------- fields


def config_fields(*, cli: bool | None = None, page: bool | None = None, resume: bool | None = None) -> list:
    """TrainConfig's fields, in declaration order, filtered by what their metadata says."""
    out = []
    for f in fields(TrainConfig):
        m = f.metadata
        if (cli is not None and bool(m["cli"]) != cli) or (page is not None and bool(m["page"]) != page) \
                or (resume is not None and bool(m["resume"]) != resume):
            continue
        out.append(f)
    return out


def flag(name: str) -> str:
    """The command-line flag of a field: ``image_size`` -> ``--image-size``."""
    return "--" + name.replace("_", "-")


def default_of(f):
    return f.default if f.default is not MISSING else f.default_factory()


def help_text(f) -> str:
    """A field's help, ending in "(default: X)" as torchvision's references do."""
    m = f.metadata
    shown = m["shown_default"]
    if shown is None:
        d = default_of(f)
        shown = "off" if m["kind"] == "bool" else d
    return f"{m['help']} (default: {shown})"


# ----------------------------------------------------------------------------- validation


def _label(name: str) -> str:
    return name.replace("_", " ")


def _check_number(f, v) -> str | None:
    m = f.metadata
    integer = m["kind"] == "int"
    ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
    ok = ok and (integer or math.isfinite(v))
    lo, hi = m["lo"], m["hi"]
    if ok and lo is not None:
        ok = v > lo if m["lo_open"] else v >= lo
    if ok and hi is not None:
        ok = v < hi if m["hi_open"] else v <= hi
    if ok:
        return None
    what = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        rng = f" in {'(' if m['lo_open'] else '['}{lo}, {hi}{')' if m['hi_open'] else ']'}"
    elif lo is not None:
        rng = f" {'>' if m['lo_open'] else '>='} {lo}"
    else:
        rng = ""
    return f"{_label(f.name)} must be {what}{rng}, got {v!r}"


def _check_levels(levels, available) -> str | None:
    if levels is None:
        return None
    try:
        levels = grid.check_levels(sorted(int(v) for v in levels))
    except (GeohierError, TypeError, ValueError) as exc:
        return "pick at least one level" if not levels else str(exc)
    if available is not None:
        missing = [lv for lv in levels if lv not in tuple(available)]
        if missing:
            return (f"level(s) {missing} are not in hierarchy.json (it has {', '.join(map(str, available))}); "
                    "rebuild labels with those levels or pick these")
    return None


def _check_weights(weights) -> str | None:
    w = str(weights).strip()
    if w in WEIGHT_CHOICES:
        return None
    if Path(w).expanduser().is_file():
        return None
    if not w.endswith(".safetensors"):
        return f"weights {w!r}: use none, imagenet, pretrained or a .safetensors file path"
    return f"weights file {w} does not exist"


def _check_level_weights(lw) -> str | None:
    if not lw:
        return None
    try:
        bad = {k: v for k, v in lw.items() if not (float(v) >= 0 and math.isfinite(float(v)))}
    except (TypeError, ValueError, AttributeError):
        return f"level weights must be LEVEL: weight pairs, got {lw!r}"
    # weights of levels a run does not train are ignored: a per-level set's runs share them
    return f"level weights must be finite and >= 0, got {bad}" if bad else None


def validate(cfg: TrainConfig, available_levels=None) -> dict[str, str]:
    """Field name -> message for each unusable value of ``cfg`` (empty when all are fine).

    The one validator: the CLI prints its messages as one ``error:`` line, the Train page
    shows each next to its widget. ``available_levels``: the levels of the workspace's
    hierarchy.json, when known (a level outside it has no classes to train)."""
    errors: dict[str, str] = {}
    for f in fields(TrainConfig):
        v = getattr(cfg, f.name)
        if f.metadata["kind"] in ("int", "float") and not (v is None and default_of(f) is None):
            msg = _check_number(f, v)
            if msg:
                errors[f.name] = msg
        choices = f.metadata.get("choices")
        if choices and v not in choices:
            errors[f.name] = f"{_label(f.name)} must be one of {', '.join(choices)}, got {v!r}"
    checks = {
        "levels": lambda: _check_levels(cfg.levels, available_levels),
        "backbone": lambda: _message(check_backbone, cfg.backbone),
        "weights": lambda: _check_weights(cfg.weights),
        "device": lambda: _message(resolve_device, cfg.device),
        "run_name": lambda: _check_run_name(cfg),
        "level_weights": lambda: _check_level_weights(cfg.level_weights),
    }
    for name, check in checks.items():
        msg = check()
        if msg:
            errors[name] = msg
    return errors


def _message(check, value) -> str | None:
    try:
        check(value)
    except GeohierError as exc:
        return str(exc)
    return None


def _check_run_name(cfg: TrainConfig) -> str | None:
    name = cfg.run_name
    if name is None:
        return None
    if cfg.group is not None:
        # a run of a per-level set: its name is the (checked) set's name + "-L<level>"
        ok = bool(str(name).strip()) and "/" not in name and name not in (".", "..")
        return None if ok else f"run name {name!r} must be a plain folder name"
    return None if RUN_NAME_RE.match(str(name)) else f"run name {name!r}: {RUN_NAME_HELP}"


def format_errors(errors: dict[str, str]) -> str:
    """One line for the command line: each message after its flag."""
    return "; ".join(f"{flag(name)}: {msg}" for name, msg in errors.items())


# ----------------------------------------------------------------------------- values <-> text


def parse_level_weights(text: str | None, levels=None) -> dict[int, float] | None:
    """``"1:1,8:0.5"`` (per level) or ``"1,1,1,0.5"`` (in level order) -> {level: weight}.

    >>> parse_level_weights("1:2,8:0.5")
    {1: 2.0, 8: 0.5}
    >>> parse_level_weights("1,0.5", [1, 3])
    {1: 1.0, 3: 0.5}
    """
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        if all(":" in p for p in parts):
            return {grid.check_level(int(a)): float(b) for a, b in (p.split(":", 1) for p in parts)}
        vals = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"--level-weights {text!r}: use LEVEL:W pairs (1:1,8:0.5) or one weight per level") from None
    if levels is None or len(vals) != len(levels):
        raise InputError(f"--level-weights {text!r}: {len(vals)} weights for levels {list(levels or [])}; "
                         "use LEVEL:W pairs")
    return {int(lv): v for lv, v in zip(levels, vals, strict=True)}


def parse_value(f, text, levels=None):
    """A field's value from its command-line text (argparse already made ints and floats)."""
    kind = f.metadata["kind"]
    if kind == "levels":
        return list(grid.parse_levels(text))
    if kind == "level_weights":
        return parse_level_weights(text, levels)
    return text


def to_argv(cfg: TrainConfig) -> list[str]:
    """``pipeline train`` flags that rebuild ``cfg`` (every value that is not the default):
    ``config_from_args(parser.parse_args(to_argv(cfg))) == cfg``. An InputError when a
    field without a flag is not at its default (the command could not pass it on)."""
    lost = [f.name for f in config_fields(cli=False) if getattr(cfg, f.name) != default_of(f)]
    if lost:
        raise InputError(f"{', '.join(lost)} cannot be passed to `pipeline train` (no flag); leave the default")
    argv: list[str] = []
    for f in config_fields(cli=True):
        v, d = getattr(cfg, f.name), default_of(f)
        if v == d or v is None:
            continue
        kind, name = f.metadata["kind"], flag(f.name)
        if kind == "bool":
            argv.append(name)  # a switch: off is the default
        elif kind == "tristate":
            argv.append(name if v else "--no-" + name[2:])
        elif kind == "levels":
            argv += [name, ",".join(str(int(lv)) for lv in v)]
        elif kind == "level_weights":
            argv += [name, ",".join(f"{int(k)}:{float(w)!r}" for k, w in sorted(v.items()))]
        elif kind == "float":
            argv += [name, repr(float(v))]
        elif kind == "int":
            argv += [name, str(int(v))]
        else:
            argv += [name, str(v)]
    return argv


# ----------------------------------------------------------------------------- recipes, names


def stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def demo_config(**overrides) -> TrainConfig:
    """The small demo model `make run` trains on the demo world: resnet18 at 64 px, a few
    minutes on 2 CPU cores, no download."""
    cfg = TrainConfig(backbone="resnet18", weights="none", image_size=64, epochs=6, batch_size=64,
                      lr=2e-3, weight_decay=0.05, warmup_epochs=0.5, label_smoothing=0.05,
                      workers=1, run_name=f"demo-resnet18-{stamp()}")
    return replace(cfg, **overrides)


def recommended_config(levels=None, cuda: bool | None = None) -> TrainConfig:
    """What the Train page starts from: the demo recipe on a CPU, the defaults on a GPU;
    no run name (the launcher picks one)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    base = TrainConfig() if cuda else demo_config()
    return replace(base, run_name=None, levels=list(levels) if levels else None)


def default_run_name(cfg: TrainConfig, levels) -> str:
    return f"{short_name(cfg.backbone)}-L{'-'.join(str(v) for v in levels)}-{stamp()}"


def job_run_name(cfg: TrainConfig) -> str:
    """The name of a background job's run when none was given: backbone + time."""
    return f"{short_name(cfg.backbone)}-{stamp()}"
