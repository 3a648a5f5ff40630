"""pipeline.train.config: the one training configuration, its validator, and the command
line and job argv derived from its fields."""

from __future__ import annotations

import sys
from dataclasses import fields, replace

import pytest
import torch

from geohier.errors import InputError
from geohier.runs import Run
from pipeline import jobs
from pipeline.cli import main
from pipeline.train import (
    MAX_IMAGE_SIZE,
    TrainConfig,
    config_from_args,
    get_args_parser,
    load_train_state,
    make_scheduler,
    save_train_state,
    to_argv,
    validate,
)
from pipeline.train.config import config_fields, help_text


def _everything_changed() -> TrainConfig:
    """A config whose every field with a flag differs from the default."""
    return TrainConfig(levels=[1, 3], per_level=True, frozen=True, backbone="resnet18", weights="none", epochs=3,
                       batch_size=16, lr=0.002, weight_decay=0.1, warmup_epochs=0.5, image_size=64,
                       label_smoothing=0.2, haversine_tau=25.0, level_weights={1: 1.0, 3: 0.5}, head="hybrid",
                       offset_weight=2.0, loss="hierarchical", balanced=True,
                       randaugment=True, hflip=0.5, mixup=0.2, cutmix=1.0, workers=0, threads=1, seed=7,
                       device="cpu", amp=False, run_name="all", max_steps=2, limit_train=10, limit_val=0)


def test_every_flag_round_trips_through_the_job_argv():
    cfg = _everything_changed()
    changed = {f.name for f in config_fields(cli=True) if getattr(cfg, f.name) != getattr(TrainConfig(), f.name)}
    assert changed == {f.name for f in config_fields(cli=True)}
    assert validate(cfg) == {}
    assert config_from_args(get_args_parser().parse_args(to_argv(cfg))) == cfg
    assert to_argv(TrainConfig()) == []  # defaults need no flag
    assert "--amp" in to_argv(replace(cfg, amp=True))
    with pytest.raises(InputError, match="head_dropout cannot be passed"):
        to_argv(TrainConfig(head_dropout=0.1))


def test_every_field_has_help_with_its_default():
    for f in fields(TrainConfig):
        assert f.metadata["help"], f.name
    by_name = {f.name: f for f in fields(TrainConfig)}
    assert help_text(by_name["epochs"]).endswith("(default: 10)")
    assert help_text(by_name["balanced"]).endswith("(default: off)")
    assert [f.name for f in config_fields(page=True)] == [
        "levels", "per_level", "backbone", "weights", "frozen", "epochs", "batch_size", "lr", "image_size",
        "label_smoothing", "haversine_tau", "head", "offset_weight", "loss", "balanced", "run_name"]


def test_one_validator_one_image_size_limit(tmp_path):
    assert validate(TrainConfig(image_size=MAX_IMAGE_SIZE)) == {}
    errs = validate(TrainConfig(image_size=MAX_IMAGE_SIZE + 1, epochs=0, label_smoothing=1.0, seed=-1,
                                threads=0, hflip=2.0, level_weights={1: -1.0}, device="tpu"))
    assert errs["image_size"] == f"image size must be an integer in [16, {MAX_IMAGE_SIZE}], got {MAX_IMAGE_SIZE + 1}"
    assert set(errs) == {"image_size", "epochs", "label_smoothing", "seed", "threads", "hflip", "level_weights",
                         "device"}
    assert "must be finite and >= 0" in errs["level_weights"] and "tpu" in errs["device"]
    assert validate(TrainConfig(epochs=2.5))["epochs"].endswith("got 2.5")  # not an integer
    assert validate(TrainConfig(lr=float("nan")))["lr"].startswith("lr must be a number in (0.0, 10.0]")
    w = tmp_path / "backbone.safetensors"
    assert "does not exist" in validate(TrainConfig(weights=str(w)))["weights"]
    w.write_bytes(b"x")
    assert validate(TrainConfig(weights=str(w))) == {}  # exists: build_model reads it
    assert "pick at least one level" in validate(TrainConfig(levels=[]))["levels"]
    assert "letters, digits" in validate(TrainConfig(run_name="a/b"))["run_name"]
    # a per-level set's runs are named <set>-L<level>: their names are the set's, checked
    assert validate(TrainConfig(run_name="x" * 80 + "-L8", group="x" * 80)) == {}


@pytest.mark.slow
def test_cli_prints_every_bad_flag_on_one_line(ws, capsys):
    rc = main(["train", "--epochs", "0", "--image-size", "4096", "--backbone", "vgg", "--weights", "none"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: --epochs: epochs must be an integer in [1, 10000], got 0")
    assert f"--image-size: image size must be an integer in [16, {MAX_IMAGE_SIZE}], got 4096" in err
    assert "--backbone: unknown backbone 'vgg'" in err
    # the job launcher refuses the same values with the same words, before starting anything
    with pytest.raises(InputError, match=r"--image-size: image size must be an integer in \[16, 2048\]"):
        jobs.launch(ws, TrainConfig(image_size=4096), argv=[sys.executable, "-c", "pass"])
    assert not list(ws.models_dir.iterdir())


def test_preset_then_explicit_flags():
    args = get_args_parser().parse_args(["--preset", "demo", "--lr", "5e-4", "--image-size", "96"])
    cfg = config_from_args(args)
    # an explicit flag wins even when it spells the plain default
    assert (cfg.backbone, cfg.lr, cfg.image_size, cfg.workers) == ("resnet18", 5e-4, 96, 1)


def test_train_state_round_trip_with_the_schedule(tmp_path):
    run = Run(tmp_path / "r")
    run.path.mkdir()
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    sched = make_scheduler(opt, total_steps=10, warmup_steps=2)
    for _ in range(3):
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
    save_train_state(run, opt, None, {"epoch": 1, "step": 3}, sched)
    assert run.has_train_state() and run.train_state()["scheduler"]["last_epoch"] == 3
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.01)
    doc = load_train_state(run, opt2, None, "cpu")
    assert doc["epoch"] == 1 and doc["step"] == 3
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    sched2 = make_scheduler(opt2, total_steps=10, warmup_steps=2, start_step=3)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert sched2.last_epoch == sched.last_epoch
