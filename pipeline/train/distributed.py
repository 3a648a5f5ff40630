"""Processes: the device and, under torchrun, the process group; the stop flag that
SIGTERM/SIGINT raise. The collectives (no-ops in a single process) are ``geohier.collective``'s.

``torchrun --nproc_per_node N -m pipeline train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK:
each process then trains on its own DistributedSampler shard (nccl on CUDA, gloo on CPU)
and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import torch

from geohier.forward import resolve_device


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's rank under torchrun (0 otherwise), before any set-up."""
    return int(os.environ.get("RANK", "0"))


def setup_env(device: str = "auto", threads: int | None = None, workers: int = 0) -> DistEnv:
    """Pick the device (``geohier.forward.resolve_device``; plain ``cuda`` means this
    process's local GPU) and, under torchrun, join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    env = DistEnv(rank, world, local, dev, world > 1)
    if threads:
        torch.set_num_threads(int(threads))
    elif dev.type == "cpu":
        # Share the cores between processes and loader workers instead of oversubscribing
        # them: OpenMP threads that wait on a preempted sibling spin, and a 2-core machine
        # with 2 compute threads + a loader worker runs several times slower than with 1.
        cores = max(1, (os.cpu_count() or 1) // world)
        torch.set_num_threads(max(1, cores - (1 if workers > 0 else 0)))
    if env.distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                             rank=rank, world_size=world)
    return env


def teardown(env: DistEnv) -> None:
    if env.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """``model`` inside DistributedDataParallel under torchrun, else itself."""
    if not env.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves and ends the run as cancelled."""

    def __init__(self):
        self.set, self.signum, self._old = False, None, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a page's thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.set, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def reason(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "stop"


def worker_init(_):
    # Workers ignore the job's SIGTERM/SIGINT: the main process decides when to stop and
    # shuts them down cleanly (otherwise they die first and the loader raises).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
