"""Training a run from start to end: ``train`` (one run), ``train_runs`` (one, or the seed's
one run per level), ``resume`` (go on from the last saved epoch).

``train`` sets up the processes, refuses bad parameters and records failure, cancellation
and success in the run's status; ``_Fit`` does the work in small steps: write the config,
load the data, build model / loss / optimizer / schedule, restore a resumed run, then for
each epoch train, validate, record and save; at the end calibrate the temperatures.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from geohier import splits as splits_mod
from geohier.backbones import short_name
from geohier.collective import any_rank, broadcast
from geohier.errors import GeohierError, InputError, WorkspaceError
from geohier.model import RUN_FORMAT, build_model, class_bounds, save_checkpoint
from geohier.presets import EvalPreset
from geohier.runs import Run, resolve_run
from geohier.workspace import Workspace, utcnow
from pipeline.train.config import TrainConfig, config_fields, default_run_name, stamp
from pipeline.train.data import TrainError, cell_positions, load_data
from pipeline.train.distributed import DistEnv, StopFlag, env_rank, setup_env, teardown, wrap
from pipeline.train.frozen import FrozenSteps
from pipeline.train.loop import evaluate, train_one_epoch
from pipeline.train.losses import GeoLoss, OffsetLoss
from pipeline.train.mixing import Mixing
from pipeline.train.progress import RunReport
from pipeline.train.schedule import make_scheduler
from pipeline.train.state import load_train_state, resumed_step, save_train_state

RESUME_OVERRIDES = tuple(f.name for f in config_fields(resume=True))


def load_hierarchy(ws: Workspace):
    from geohier.hierarchy import Hierarchy

    if not ws.hierarchy_path.exists():
        raise WorkspaceError(f"no label hierarchy at {ws.hierarchy_path}: run `python -m pipeline labels` first")
    return Hierarchy.load(ws.hierarchy_path)


def resolve_levels(cfg: TrainConfig, hierarchy) -> list[int]:
    """The levels a run trains: ``cfg.levels`` (every level of the hierarchy when None),
    each of which must have at least two classes."""
    levels = list(hierarchy.levels) if not cfg.levels else sorted({int(v) for v in cfg.levels})
    missing = [lv for lv in levels if lv not in hierarchy.levels]
    if missing:
        raise InputError(f"--levels {missing} are not in hierarchy.json (it has "
                         f"{', '.join(map(str, hierarchy.levels))}); rebuild labels with those levels or pick these")
    for lv in levels:
        n = hierarchy.num_classes[lv]
        if n < 2:
            raise InputError(f"level {lv} has {n} class{'es' if n != 1 else ''}; a classifier needs at least 2: "
                             f"lower --min-images for level {lv} in `pipeline labels`, drop the level, or add images")
    return levels


def prepare_run(ws: Workspace, cfg: TrainConfig, levels) -> Run:
    """The run's directory: new (or made by a job launcher with only status/job files)."""
    name = cfg.run_name or default_run_name(cfg, levels)
    run = Run(ws.models_dir / name)
    started = run.config_path.exists()
    has_model = run.meta_path.exists() or run.weights_path.exists()
    if started and not has_model and run.status().get("state") == "failed":
        # a run that failed before its first epoch: reuse the name
        run.metrics_path.unlink(missing_ok=True)
        run.config_path.unlink()
        started = False
    if started or has_model:
        raise InputError(f"a run named {name!r} already exists in {ws.models_dir}; pick another --run-name "
                         f"or continue it with --resume {run.path}")
    run.path.mkdir(parents=True, exist_ok=True)
    return run


def train(ws: Workspace, config: TrainConfig, resume_dir: str | os.PathLike | None = None) -> Path:
    """Train one run (all of ``config.levels`` on one backbone) and return its directory.

    With ``resume_dir``: continue that run from its last saved epoch (its stored config,
    except for the epoch count, workers, device and max_steps given in ``config``).
    Raises GeohierError for anything a user can fix; the run's status then says
    failed with the reason. A SIGTERM/SIGINT ends it as cancelled (returns normally).
    With ``config.per_level`` it trains one run per level (``train_runs``) and returns the
    set's directory (models/<group>/, with the set's status and config).
    """
    if config.per_level:
        runs = train_runs(ws, config)
        return runs[0].parent / runs[0].name.rsplit("-L", 1)[0] if runs else ws.models_dir
    threads = torch.get_num_threads()
    env = setup_env(config.device, config.threads, config.workers)
    try:
        return _train(ws, config, env, Run(resume_dir) if resume_dir else None)
    finally:
        torch.set_num_threads(threads)  # callers (a page, quickstart) keep their setting
        teardown(env)


def _train(ws: Workspace, cfg: TrainConfig, env: DistEnv, resumed: Run | None) -> Path:
    cfg.validate()
    hierarchy = load_hierarchy(ws)
    if resumed is not None:
        _check_resumable(resumed, hierarchy)
    levels = resolve_levels(cfg, hierarchy)
    run = resumed or Run(broadcast(str(prepare_run(ws, cfg, levels).path) if env.main else None, env))
    cfg = replace(cfg, levels=levels, run_name=run.name)
    report = RunReport(run, env.main)
    stop = StopFlag()
    try:
        with stop:  # before "running" is announced: a cancel from then on is always graceful
            report.update(state="running", epoch=0, epochs=cfg.epochs, step=0, steps=None, progress=0.0,
                          eta_s=None, error=None, run=run.name, device=str(env.device), world_size=env.world)
            fit_class = FrozenFit if cfg.frozen else _Fit
            fit_class(ws, cfg, env, hierarchy, run, report, stop, resumed=resumed is not None).fit()
            return run.path
    except torch.OutOfMemoryError:
        msg = (f"out of memory at --batch-size {cfg.batch_size} and --image-size {cfg.image_size} "
               f"on {env.device}: lower --batch-size or --image-size")
        _fail(report, msg)
        raise TrainError(msg) from None
    except GeohierError as exc:
        _fail(report, str(exc))
        raise
    except KeyboardInterrupt:
        report.update(state="cancelled", eta_s=None)
        report.log("cancelled (interrupted)")
        raise
    except BaseException as exc:
        report.update(state="failed", error=f"{type(exc).__name__}: {exc}", eta_s=None)
        report.log_text(traceback.format_exc())
        raise


def _fail(report: RunReport, msg: str) -> None:
    report.update(state="failed", error=msg, eta_s=None)
    report.log(f"failed: {msg}")


def _check_resumable(run: Run, hierarchy) -> None:
    if not run.config_path.exists():
        raise WorkspaceError(f"{run.path} has no {run.config_path.name}: not a run that can be resumed")
    prior = run.require_config()
    if prior.get("hierarchy_hash") != hierarchy.hash:
        raise TrainError(f"the workspace's hierarchy changed since run {run.name} started "
                         f"(hash {str(prior.get('hierarchy_hash'))[:12]} then, {hierarchy.hash[:12]} now): "
                         "its classes no longer match; start a new run")


class _Fit:
    """One run's training, set up step by step (``fit`` calls them in order)."""

    def __init__(self, ws, cfg: TrainConfig, env: DistEnv, hierarchy, run: Run, report: RunReport,
                 stop: StopFlag, resumed: bool):
        self.ws, self.cfg, self.env, self.hierarchy = ws, cfg, env, hierarchy
        self.run, self.report, self.stop, self.resumed = run, report, stop, resumed
        self.levels = list(cfg.levels)
        self.amp = cfg.amp if cfg.amp is not None else env.device.type == "cuda"
        self.last_record: dict | None = None

    def fit(self) -> None:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed + env.rank)
        np.random.seed(cfg.seed + env.rank)
        self.attach_split()
        self.write_config()
        self.make_model()
        self.load_data()
        self.build()
        start_epoch, step = self.restore()
        self.scheduler = make_scheduler(self.optimizer, self.total_steps,
                                        int(round(cfg.warmup_epochs * self.steps_per_epoch)), start_step=step)
        self.model = wrap(self.model, env)
        self.mixing = Mixing(cfg.mixup, cfg.cutmix, torch.Generator().manual_seed(cfg.seed + 1000 * env.rank))
        self.clock = _Eta(self.total_steps, step, start_epoch, cfg.epochs)
        self.report.update(steps=self.total_steps, step=step, progress=round(step / self.total_steps, 4),
                           epoch=start_epoch - 1)
        for epoch in range(start_epoch, cfg.epochs + 1):
            if not self.epoch(epoch):
                # the cut epoch counts as not done: --resume redoes it (from these weights)
                self.save(epoch - 1, "cancelled", (epoch - 1) * self.steps_per_epoch)
                return self.cancelled()
            if any_rank(self.stop.set, env) and epoch < cfg.epochs:
                return self.cancelled()
        self.done()

    # ------------------------------------------------------------------ set-up

    def attach_split(self) -> None:
        """The run's own split (``geohier.splits``): a resumed run keeps the one it started
        on; a new run (or one from before split versions) takes the workspace's current
        split, kept in the workspace's store and linked into the run directory."""
        own = None
        if self.resumed:
            prior = self.run.config()
            own = splits_mod.of_run(self.run, self.ws, prior if splits_mod.recorded_hash(prior) else None)
            if own is None:
                self.report.log("this run records no split (started before split versions): it goes on with "
                                "the workspace's current split, which is recorded from now on")
        if own is None:
            own = splits_mod.current(self.ws) if self.env.main else None
            if self.env.main:
                if own is None:
                    raise TrainError("no image has a split: run `python -m pipeline labels` first")
                splits_mod.attach(self.run, own, self.ws)
            split_hash = broadcast(own.hash if own is not None else None, self.env)
            own = own if own is not None else splits_mod.Splits.load(self.run.split_path)
            if own.hash != split_hash:
                raise TrainError(f"run {self.run.name}'s split changed while it started; start it again")
        elif self.env.main and not self.run.split_path.is_file():
            splits_mod.attach(self.run, own, self.ws)
        self.splits = own

    def write_config(self) -> None:
        cfg, h = self.cfg, self.hierarchy
        if self.env.main:
            self.run.write_config({**cfg.to_dict(), "hierarchy_hash": h.hash, "levels": self.levels,
                                    "split": self.splits.describe(),
                                    "created_at": utcnow(), "format": RUN_FORMAT})
        self.report.log(f"{'resuming' if self.resumed else 'starting'} run {self.run.name}: {cfg.backbone} "
                        f"levels {self.levels} classes {[h.num_classes[lv] for lv in self.levels]} on "
                        f"{self.env.device}" + (f" x{self.env.world} processes" if self.env.distributed else ""))

    def make_model(self) -> None:
        """The model (its backbone says what preprocessing the data gets)."""
        cfg, env, h = self.cfg, self.env, self.hierarchy
        parents = ({lv: h.ancestors(lv, prev).tolist() for prev, lv in zip(self.levels, self.levels[1:])}
                   if cfg.loss == "hierarchical" else None)
        self.net = build_model(cfg.backbone, {lv: h.num_classes[lv] for lv in self.levels}, weights=cfg.weights,
                               head_dropout=cfg.head_dropout, image_size=cfg.image_size,
                               frozen=cfg.frozen, head=cfg.head, loss=cfg.loss,
                               parents=parents).to(env.device)
        self.model = self.net

    def load_data(self) -> None:
        self.data = data = load_data(self.ws, self.hierarchy, self.cfg, self.levels, self.env,
                                     preprocess=self.net.preprocess, splits=self.splits)
        ds = data.train_ds
        self.stats = {"missing": ds.stats["missing"], "unlabelled": ds.stats["unlabelled"], "unreadable": 0,
                      "train_images": len(ds), "val_images": len(data.val_ds)}
        if ds.stats["missing"]:
            self.report.log(f"skipped {ds.stats['missing']} train images missing on disk, e.g. "
                            f"{', '.join(ds.missing_examples[:3])}")
        if not len(data.val_ds):
            self.report.log("the val split is empty: no validation metrics (run `pipeline labels` to assign splits)")
        self.steps_per_epoch = min(len(data.train_loader), self.cfg.max_steps or len(data.train_loader))
        if self.steps_per_epoch == 0:
            raise TrainError("the train loader yields no batch; lower --batch-size")
        self.total_steps = self.steps_per_epoch * self.cfg.epochs

    def build(self) -> None:
        """Model, loss, optimizer and grad scaler; the meta every checkpoint carries."""
        cfg, env, h, levels = self.cfg, self.env, self.hierarchy, self.levels
        model = self.net
        if env.device.type == "cuda" and not cfg.frozen:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        centroids = {}
        if cfg.haversine_tau > 0:
            for lv in levels:
                la, lo = h.centroids(lv)
                centroids[lv] = (torch.as_tensor(la, device=env.device), torch.as_tensor(lo, device=env.device))
        pos = cell_positions(self.data.train_ds, levels[-1], h)
        offset = None
        if cfg.head == "hybrid":  # offsets from the same points the Predictor adds them to
            offset = OffsetLoss(torch.as_tensor(pos, dtype=torch.float64, device=env.device),
                                torch.as_tensor(class_bounds(h, levels[-1]), device=env.device), cfg.offset_weight)
        self.criterion = GeoLoss(levels, cfg.level_weights, cfg.label_smoothing, cfg.haversine_tau, centroids,
                                 offset=offset)
        # no weight decay on norms and biases (torchvision's --norm-weight-decay 0 habit)
        trained = [p for p in model.parameters() if p.requires_grad]  # a frozen backbone's are not
        decay = [p for p in trained if p.ndim > 1]
        no_decay = [p for p in trained if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        fp16 = self.amp and env.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.positions = (np.array([p[0] for p in pos]), np.array([p[1] for p in pos]))
        self.meta_base = {"format": RUN_FORMAT, "run": self.run.name, "hierarchy": h.to_dict(),
                          "hierarchy_hash": h.hash, "split": self.splits.describe(),
                          "input": EvalPreset.from_meta({"input": self.net.preprocess}).to_dict(),
                          "backbone": self.net.backbone_info,
                          "temperatures": {str(lv): 1.0 for lv in levels}, "config": cfg.to_dict(),
                          "cell_positions": {str(levels[-1]): pos},
                          "data": {"sources": _sources(self.data.train_ds)}}

    def restore(self) -> tuple[int, int]:
        """(first epoch, steps taken) — (1, 0) unless a resumed run saved an epoch."""
        if self.resumed and self.run.state_json_path.exists():
            from geohier.fileio import read_safetensors

            doc = load_train_state(self.run, self.optimizer, self.scaler, self.env.device)
            state = read_safetensors(self.run.weights_path, TrainError, f"cannot resume: {self.run.weights_path} "
                                     "cannot be read", device=str(self.env.device))
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if unexpected or any(not (self.cfg.frozen and k.startswith("backbone.")) for k in missing):
                raise TrainError(f"{self.run.weights_path} does not fit the run's model (missing "
                                 f"{missing[:3]}, unexpected {unexpected[:3]}); start a new run")
            for g in self.optimizer.param_groups:
                g["initial_lr"] = self.cfg.lr  # the peak of the schedule (--lr of the run)
            self.report.truncate_metrics(int(doc["epoch"]))
            self.report.log(f"resumed after epoch {doc['epoch']} (step {doc['step']})")
            return int(doc["epoch"]) + 1, resumed_step(doc)
        if self.resumed:
            self.report.log("no saved epoch to resume from: starting at epoch 1")
            self.report.truncate_metrics(0)
        return 1, 0

    # ------------------------------------------------------------------ epochs

    def epoch(self, epoch: int) -> bool:
        """Train, validate, record and save one epoch; False when it was cut short."""
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed + 7919 * epoch + env.rank)
        self.data.train_sampler.set_epoch(epoch)
        t0 = time.monotonic()
        first = self.scheduler.last_epoch

        def on_step(i: int, loss: float) -> None:
            step = first + i
            self.report.update(force=False, epoch=epoch - 1, step=step, steps=self.total_steps,
                               progress=round(step / self.total_steps, 4),
                               eta_s=self.clock.eta(step, epoch), loss=round(loss, 4), skipped=self.skipped())

        tr = train_one_epoch(self.model, self.criterion, self.optimizer, self.scheduler, self.scaler,
                             self.data.train_loader, env, epoch=epoch, epochs=cfg.epochs,
                             steps=self.steps_per_epoch, stop=self.stop, mixing=self.mixing, amp=self.amp,
                             image_size=cfg.image_size, stats=self.stats, log=self.report.log, on_step=on_step)
        if tr["stopped"]:
            return False
        t1 = time.monotonic()
        va = evaluate(self.model, self.criterion, self.data.val_loader, env, positions=self.positions,
                      amp=self.amp, stats=self.stats)
        self.clock.eval_s += time.monotonic() - t1
        step = self.scheduler.last_epoch
        record = {"epoch": epoch, "train_loss": _r(tr["loss"]), "val_loss": _r(va["loss"]),
                  "lr": tr["lr"], "time_s": round(time.monotonic() - t0, 2),
                  "train": _round_levels(tr["levels"]), "val": _round_levels(va["levels"]) if va["n"] else {},
                  "val_km": {k: _r(v) for k, v in va["km"].items()}, "step": step, "skipped": self.skipped()}
        self.report.append_metrics(record)
        self.last_record = record
        self.save(epoch, "running", step)
        v1 = " ".join(f"L{lv} {record['val'][str(lv)]['top1']:.3f}" for lv in self.levels) if record["val"] else "-"
        self.report.log(f"epoch {epoch}/{cfg.epochs} train_loss {record['train_loss']} val_loss "
                        f"{record['val_loss']} val_top1 {v1} median_km {record['val_km'].get('median_km', '-')} "
                        f"({record['time_s']} s)")
        self.report.update(epoch=epoch, step=step, progress=round(step / self.total_steps, 4),
                           skipped=self.skipped())
        return True

    def skipped(self) -> dict:
        return {k: self.stats[k] for k in ("missing", "unreadable")}

    def save(self, epoch: int, state: str, step: int, with_state: bool = True) -> None:
        """The checkpoint (weights + meta) and, for --resume, the train state after ``epoch``."""
        if not self.env.main:
            return
        meta = {**self.meta_base, "metrics": self.last_record or {},
                "training": {"epoch": epoch, "epochs": self.cfg.epochs, "state": state}}
        save_checkpoint(self.run.path, self.net, meta)
        if with_state:
            save_train_state(self.run, self.optimizer, self.scaler, {"epoch": epoch, "step": step},
                             self.scheduler)

    # ------------------------------------------------------------------ the end

    def cancelled(self) -> None:
        self.report.update(state="cancelled", eta_s=None)
        self.report.log(f"cancelled ({self.stop.reason()}); weights saved; continue with --resume {self.run.path}")

    def done(self) -> None:
        cfg = self.cfg
        self.report.update(progress=1.0, eta_s=0.0, step=self.total_steps, epoch=cfg.epochs)
        self.save(cfg.epochs, "done", self.total_steps, with_state=False)
        # done before calibrating: calibrate_run refuses a run that is still running
        self.report.update(state="done", eta_s=0.0, progress=1.0)
        if self.env.main:
            calibrate(self.run, self.ws, self.report, self.env)
            self.report.log(f"done: {self.run.path}")


class FrozenFit(FrozenSteps, _Fit):
    """``_Fit`` on cached features: a frozen backbone's run (``pipeline.train.frozen``)."""


class _Eta:
    """Seconds left: the mean time of the steps taken here, and of the validation passes."""

    def __init__(self, total_steps: int, first_step: int, first_epoch: int, epochs: int):
        self.total, self.first_step, self.first_epoch, self.epochs = total_steps, first_step, first_epoch, epochs
        self.t0, self.eval_s = time.monotonic(), 0.0

    def eta(self, step: int, epoch: int) -> float:
        rate = (time.monotonic() - self.t0 - self.eval_s) / max(1, step - self.first_step)
        per_eval = self.eval_s / max(1, epoch - self.first_epoch + 1)
        return round(rate * (self.total - step) + per_eval * (self.epochs - epoch + 1), 1)


def calibrate(run: Run, ws: Workspace, report: RunReport, env: DistEnv) -> None:
    """Per-level temperatures on the val split (``pipeline.evaluate.calibrate_run``); a
    finished model stays usable (temperatures 1.0) when that fails."""
    from pipeline.evaluate import calibrate_run

    try:
        result = calibrate_run(run.path, ws, progress=False, device=str(env.device))
        temps = {lv: round(float(r["temperature"]), 3) for lv, r in (result or {}).items()
                 if isinstance(r, dict) and "temperature" in r}
        report.log(f"calibrated on val: temperatures {temps}" if temps else "calibrated on val")
    except GeohierError as exc:
        report.log(f"calibration skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - a finished model is still usable without temperatures
        report.log(f"calibration failed ({type(exc).__name__}: {exc}); temperatures stay 1.0")


def _sources(ds) -> dict[str, int]:
    """Train images per manifest source (demo, photos, csv, mapillary): what tells a run
    trained on the synthetic demo world alone (``geohier.prediction.synthetic_note``)."""
    names, counts = np.unique(np.asarray(ds.sources, dtype=str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def _r(v, nd: int = 4):
    if isinstance(v, float):
        return None if not np.isfinite(v) else round(v, nd)
    return v


def _round_levels(d: dict) -> dict:
    return {lv: {k: round(v, 4) for k, v in m.items()} for lv, m in d.items()}


# ----------------------------------------------------------------------------- sets, resuming


def train_runs(ws: Workspace, config: TrainConfig) -> list[Path]:
    """``train`` for one config, or with ``per_level`` the seed's shape: one run per level,
    ``<group>-L<k>``, each an ordinary run with one level (config.group names the set).

    The group name (``config.run_name``) also gets a directory holding the set's
    status (overall progress) and a config listing the runs, so a job launcher
    that watches ``models/<run_name>/`` sees the whole set."""
    if not config.per_level:
        return [train(ws, config)]
    config.validate()
    levels = resolve_levels(config, load_hierarchy(ws))
    group = config.run_name or f"{short_name(config.backbone)}-perlevel-L{'-'.join(map(str, levels))}-{stamp()}"
    names = [f"{group}-L{lv}" for lv in levels]
    return _train_group(ws, config, group, levels, names, resume=False)


def _train_group(ws, config, group, levels, names, resume: bool) -> list[Path]:
    main = env_rank() == 0
    gset = Run(ws.models_dir / group)
    report = RunReport(gset, main)
    if main:
        gset.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            if gset.config_path.exists():
                raise InputError(f"a run named {group!r} already exists in {ws.models_dir}; pick another --run-name")
            gset.write_config({**replace(config, levels=levels, run_name=group).to_dict(), "per_level_group": True,
                               "runs": names, "created_at": utcnow(), "format": RUN_FORMAT})
    out = []
    for i, (lv, name) in enumerate(zip(levels, names, strict=True)):
        sub_run = Run(ws.models_dir / name)
        if resume and sub_run.status().get("state") == "done":
            out.append(sub_run.path)
            continue
        report.update(state="running", epoch=0, epochs=config.epochs, step=i, steps=len(levels),
                      progress=round(i / len(levels), 4), eta_s=None, error=None, current=name)
        sub = replace(config, per_level=False, levels=[lv], run_name=name, group=group)
        try:
            if resume and sub_run.config_path.exists():
                out.append(train(ws, sub, resume_dir=sub_run.path))
            else:
                out.append(train(ws, sub))
        except BaseException as exc:
            report.update(state="cancelled" if isinstance(exc, KeyboardInterrupt) else "failed",
                          error=f"{name}: {exc}", eta_s=None)
            raise
        st = sub_run.status().get("state")
        if st != "done":
            report.update(state=st or "failed", eta_s=None, error=None if st == "cancelled" else f"{name} {st}")
            return out
    report.update(state="done", progress=1.0, step=len(levels), eta_s=0.0, current=None)
    return out


def resume(ws: Workspace, run_dir: str | os.PathLike, **overrides) -> list[Path]:
    """Continue a cancelled / failed / finished run (or a per-level set) from its last
    saved epoch; ``overrides`` may change epochs (to train longer), workers, device,
    max_steps and threads (the fields marked ``resume``)."""
    try:
        run = resolve_run(ws.models_dir, run_dir)
    except WorkspaceError:
        raise WorkspaceError(f"--resume {run_dir}: no such run directory") from None
    if not run.config_path.exists():
        raise WorkspaceError(f"{run.path} has no {run.config_path.name}: not a run that can be resumed")
    stored = run.require_config()
    cfg = TrainConfig.from_dict(stored)
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if k in RESUME_OVERRIDES and v is not None})
    if stored.get("per_level_group"):
        levels = [int(v) for v in stored["levels"]]
        return _train_group(ws, replace(cfg, per_level=True), run.name, levels, stored["runs"], resume=True)
    return [train(ws, cfg, resume_dir=run.path)]
