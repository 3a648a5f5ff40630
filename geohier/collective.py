"""Collectives across the processes of a torchrun job, no-ops in a single process.

``env`` is anything with ``distributed`` (bool) and ``world`` (int) attributes, such as
``pipeline.train.distributed.DistEnv``, or None; the collectives run only while the
process group is up. Training (``pipeline.train``) and embedding (``geohier.embeddings``)
both use these.

>>> broadcast("rank 0's", None), gather(3, None), any_rank(True, None)
("rank 0's", [3], True)
"""

from __future__ import annotations

import torch


def active(env) -> bool:
    """Whether ``env`` is one of several processes of an initialised process group."""
    return env is not None and bool(getattr(env, "distributed", False)) and torch.distributed.is_initialized()


def broadcast(obj, env):
    """``obj`` of rank 0 on every rank."""
    if not active(env):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, env) -> list:
    """Every rank's ``obj``, in rank order ([obj] in one process)."""
    if not active(env):
        return [obj]
    out = [None] * env.world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(env) -> None:
    """Wait until every rank gets here."""
    if active(env):
        torch.distributed.barrier()


def any_rank(flag: bool, env) -> bool:
    """True on every rank if it is True on one (so all ranks stop at the same step)."""
    if not active(env):
        return bool(flag)
    device = env.device if getattr(env, "device", None) is not None and env.device.type == "cuda" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)
