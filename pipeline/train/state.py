"""Optimizer (and grad-scaler, lr-schedule) state <-> a run's train_state files, no pickle.

The optimizer's tensors (AdamW's moments) go to safetensors at ``Run.state_tensors_path``;
its scalars, its parameter groups, the scaler, the schedule and the run's counters (epoch,
step) go to JSON through ``Run.write_train_state``. ``--resume`` reads both back.
"""

from __future__ import annotations

import torch

from geohier.errors import WorkspaceError
from geohier.fileio import read_safetensors, write_safetensors
from geohier.runs import Run

STATE_FORMAT = "geohier-train-state/1"


def save_train_state(run: Run, optimizer: torch.optim.Optimizer, scaler, counters: dict,
                     scheduler=None) -> None:
    """Write the state a resumed run needs; ``counters`` (epoch, step) go into the JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    doc = {"format": STATE_FORMAT, **counters, "optimizer": {"param_groups": groups, "scalars": scalars},
           "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
           "scheduler": _scheduler_state(scheduler, counters.get("step"))}
    write_safetensors(run.state_tensors_path, tensors or {"empty": torch.zeros(0)})
    run.write_train_state(doc)


def _scheduler_state(scheduler, step: int | None) -> dict | None:
    """Where the schedule stands at the saved point: its peak rates and step count. The
    step is the counters' (the start of a cut epoch, which --resume redoes), not the
    scheduler's own count of the steps it took into that epoch."""
    if scheduler is None:
        return None
    return {"last_epoch": int(scheduler.last_epoch if step is None else step),
            "base_lrs": [float(v) for v in scheduler.base_lrs]}


def load_train_state(run: Run, optimizer: torch.optim.Optimizer, scaler, device) -> dict:
    """Restore ``optimizer`` (and ``scaler``) from the run's train state; the JSON document
    (counters, ``scheduler``) is returned. A WorkspaceError when it does not fit."""
    doc = run.train_state()
    tensors = read_safetensors(run.state_tensors_path, WorkspaceError,
                               f"cannot read the optimizer state {run.state_tensors_path}", device=str(device))
    state: dict = {}
    for key, t in tensors.items():
        if key == "empty":
            continue
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = t
    for pid, kv in doc["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(kv)
    for st in state.values():  # AdamW keeps "step" as a CPU float tensor
        if "step" in st and torch.is_tensor(st["step"]):
            st["step"] = st["step"].to("cpu")
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in doc["optimizer"]["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise WorkspaceError(f"{run.state_json_path} does not fit this model's optimizer: {exc}") from None
    if doc.get("scaler") and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(doc["scaler"])
    return doc


def resumed_step(doc: dict) -> int:
    """The optimizer steps taken before the saved point: where the schedule goes on (a
    train state saved before the schedule was recorded: the run's step counter)."""
    sched = doc.get("scheduler") or {}
    return int(sched.get("last_epoch", doc["step"]))
