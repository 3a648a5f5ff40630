"""``python -m pipeline train``: train a multi-level geolocation classifier.

Wiring in the style of torchvision's references/classification/train.py:
``get_args_parser`` -> ``TrainConfig`` -> ``train(ws, config)``, which calls ``load_data``,
then ``train_one_epoch`` and ``evaluate`` once per epoch. The same command runs under
``torchrun --nproc_per_node N -m pipeline train ...`` (DistributedDataParallel, one
DistributedSampler shard per process, rank 0 alone writes).

==============  ==========================================================================
module          its one job
==============  ==========================================================================
config          TrainConfig (the one training configuration), its validator, to_argv
cli             the flags (derived from TrainConfig's fields) and the command
fit             train / train_runs / resume: a run from start to end, step by step
loop            train_one_epoch and the validation pass (via geohier.forward)
losses          per-level cross-entropy, label and haversine smoothing
mixing          MixUp / CutMix
schedule        linear warm-up + cosine decay (torch's LambdaLR)
distributed     device and process group, collectives, the SIGTERM stop flag
samplers        rank-sharded evaluation and class-balanced sampling
data            datasets, loaders and class positions of a run
state           optimizer / scaler / schedule state <-> safetensors + JSON
progress        a run's status, log and metrics history while it trains (through Run)
==============  ==========================================================================

A run directory (models/<run>/, owned by ``geohier.runs.Run``) receives its config, its
status (state queued|running|done|failed|cancelled, epoch, step, progress, ETA), its log,
one metrics record per epoch, the model (``geohier.model.save_checkpoint``, every epoch)
and the train state for ``--resume``.

Loss: cross-entropy per level (weights per level), label smoothing, and optionally PIGEON's
haversine smoothing. Optimiser: AdamW, linear warm-up then cosine decay, per step.
"""

from pipeline.train.cli import config_from_args, get_args_parser, main, register, run
from pipeline.train.config import (
    MAX_IMAGE_SIZE,
    RUN_NAME_RE,
    TrainConfig,
    default_run_name,
    demo_config,
    format_errors,
    parse_level_weights,
    recommended_config,
    to_argv,
    validate,
)
from pipeline.train.data import TrainError, cell_positions, load_data
from pipeline.train.distributed import DistEnv, StopFlag, setup_env
from pipeline.train.fit import resolve_levels, resume, train, train_runs
from pipeline.train.loop import evaluate, train_one_epoch
from pipeline.train.losses import GeoLoss, haversine_targets, level_loss
from pipeline.train.mixing import Mixing, mix_batch
from pipeline.train.samplers import BalancedSampler, ShardSampler
from pipeline.train.schedule import make_scheduler, warmup_cosine
from pipeline.train.state import load_train_state, save_train_state

__all__ = [
    "MAX_IMAGE_SIZE", "RUN_NAME_RE", "BalancedSampler", "DistEnv", "GeoLoss", "Mixing", "ShardSampler",
    "StopFlag", "TrainConfig", "TrainError", "cell_positions", "config_from_args", "default_run_name",
    "demo_config", "evaluate", "format_errors", "get_args_parser", "haversine_targets", "level_loss",
    "load_data", "load_train_state", "main", "make_scheduler", "mix_batch", "parse_level_weights",
    "recommended_config", "register", "resolve_levels", "resume", "run", "save_train_state", "setup_env",
    "to_argv", "train", "train_one_epoch", "train_runs", "validate", "warmup_cosine",
]
