"""pipeline.train and geohier.dataset: losses, the run directory, resume, cancel, DDP, bad data.

The world here is tiny and easy on purpose: 48 JPEGs of 32 px whose colour is their L1
quadrant, so a resnet18 at 32 px beats chance at level 1 within a few dozen steps.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from geohier.dataset import IGNORE_INDEX, ManifestDataset, Skipped, collate
from geohier.errors import GeohierError
from geohier.hierarchy import build_hierarchy
from geohier.model import load_run
from geohier.presets import EvalPreset
from geohier.workspace import Workspace
from pipeline import train as T

pytestmark = pytest.mark.slow  # trains, one run under torchrun: `make test-fast` skips this module

ROOT = Path(__file__).resolve().parents[1]
COLORS = {0: (200, 40, 40), 1: (40, 200, 40), 2: (40, 40, 200), 3: (200, 200, 40)}  # NW NE SW SE


def make_world(root: Path, n: int = 48, levels=(1, 3), seed: int = 0, size: int = 32) -> Workspace:
    """A workspace whose images are coloured by quadrant; every 6th image is val."""
    rng = np.random.default_rng(seed)
    ws = Workspace(root / "data", root / "models")
    q = np.arange(n) % 4
    lat = np.where(q < 2, rng.uniform(10, 60, n), rng.uniform(-60, -10, n))
    lon = np.where(q % 2 == 0, rng.uniform(-150, -30, n), rng.uniform(30, 150, n))
    with ws.manifest() as m:
        splits = {}
        for i in range(n):
            c = np.array(COLORS[int(q[i])]) + rng.integers(-20, 20, 3)
            arr = np.clip(c + rng.integers(-15, 15, (size, size, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=90)
            new = m.store_image(buf.getvalue(), "jpg", source="test", source_id=str(i),
                                lat=float(lat[i]), lon=float(lon[i]))
            splits[new] = "val" if i % 6 == 5 else "train"
        m.set_splits(splits)
    build_hierarchy(lat, lon, list(levels), min_images=1).save(ws.hierarchy_path)
    return ws


def tiny(**kw) -> T.TrainConfig:
    base = T.TrainConfig(backbone="resnet18", weights="none", image_size=32, epochs=1, batch_size=8,
                         lr=2e-3, warmup_epochs=0.0, label_smoothing=0.0, workers=0, device="cpu", threads=1)
    return replace(base, **kw)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two compute threads on two shared, busy cores run ~10x slower than one.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Workspace:
    return make_world(tmp_path_factory.mktemp("world"))


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- losses


def test_haversine_targets_three_class_toy():
    lat = torch.tensor([0.0, 0.0, 0.0])
    lon = torch.tensor([0.0, 1.0, 2.0])  # 111.19 km apart along the equator
    tau = 2 * math.pi * 6371.0 / 360  # one degree of arc
    q = T.haversine_targets(torch.tensor([0, 1]), lat, lon, tau)  # (2, 3)
    e = math.exp(-1)
    assert q.shape == (2, 3)
    assert torch.allclose(q.sum(1), torch.ones(2))
    assert torch.allclose(q[0], torch.tensor([1, e, e * e]) / (1 + e + e * e), atol=1e-6)
    assert torch.allclose(q[1], torch.tensor([e, 1, e]) / (1 + 2 * e), atol=1e-6)
    assert q.argmax(1).tolist() == [0, 1]


def test_haversine_targets_sharpen_with_small_tau():
    lat, lon = torch.tensor([10.0, 20.0, -40.0]), torch.tensor([0.0, 50.0, 120.0])
    q = T.haversine_targets(torch.tensor([2]), lat, lon, 1.0)
    assert q[0, 2] == pytest.approx(1.0)


def test_level_loss_ignores_minus_100():
    z = torch.randn(4, 5)
    y = torch.tensor([1, IGNORE_INDEX, 3, IGNORE_INDEX])
    assert T.level_loss(z, y).item() == pytest.approx(F.cross_entropy(z[[0, 2]], y[[0, 2]]).item(), rel=1e-6)
    z.requires_grad_(True)
    none = T.level_loss(z, torch.full((4,), IGNORE_INDEX))
    assert none.item() == 0.0
    none.backward()  # still part of the graph (DDP needs every head used)
    assert torch.count_nonzero(z.grad) == 0


def test_level_loss_with_smoothing_and_haversine():
    z = torch.randn(3, 3)
    y = torch.tensor([0, 2, IGNORE_INDEX])
    lat, lon = torch.zeros(3), torch.tensor([0.0, 1.0, 2.0])
    assert T.level_loss(z, y, 0.1).item() == pytest.approx(
        F.cross_entropy(z[:2], y[:2], label_smoothing=0.1).item(), rel=1e-5)
    q = T.haversine_targets(y[:2], lat, lon, 100.0)
    want = -(q * F.log_softmax(z[:2], 1)).sum(1).mean()
    assert T.level_loss(z, y, 0.0, 100.0, (lat, lon)).item() == pytest.approx(want.item(), rel=1e-5)


def test_geo_loss_weights_levels_and_mixes():
    out = {1: torch.randn(4, 4), 3: torch.randn(4, 6)}
    y = torch.tensor([[0, 1], [1, IGNORE_INDEX], [2, 5], [3, 0]])
    loss = T.GeoLoss([1, 3], {1: 2.0, 3: 0.5})
    total, parts = loss(out, y)
    assert total.item() == pytest.approx(2 * parts[1].item() + 0.5 * parts[3].item(), rel=1e-6)
    perm = torch.tensor([1, 0, 3, 2])
    mixed, mparts = loss(out, y, (0.25, perm))
    want = 0.25 * T.level_loss(out[1], y[:, 0]) + 0.75 * T.level_loss(out[1], y[perm, 0])
    assert mparts[1].item() == pytest.approx(want.item(), rel=1e-6)


def _schedule(total, warmup, base=1.0, start=0, steps=None):
    """The rates torch's scheduler gives the optimizer at each step from ``start``."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = T.make_scheduler(opt, total, warmup, start_step=start)
    lrs = []
    for _ in range(total - start if steps is None else steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_lr_schedule_and_level_weights_parsing():
    lrs = _schedule(100, 10)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] < 0.02
    assert lrs == pytest.approx([T.warmup_cosine(s, 100, 10) for s in range(100)])
    # a resumed schedule goes on where it stopped; a longer one where the new length says
    assert _schedule(100, 10, start=40) == pytest.approx(lrs[40:])
    assert _schedule(200, 10, start=40, steps=1) == pytest.approx([T.warmup_cosine(40, 200, 10)])
    assert _schedule(10, 0, base=0.5)[0] == pytest.approx(0.5)
    assert T.parse_level_weights("1:1,8:0.5") == {1: 1.0, 8: 0.5}
    assert T.parse_level_weights("2,1", [1, 3]) == {1: 2.0, 3: 1.0}
    with pytest.raises(GeohierError, match="level-weights"):
        T.parse_level_weights("2,1,1", [1, 3])


# ----------------------------------------------------------------------------- dataset


def test_dataset_labels_and_skips(tmp_path):
    ws = make_world(tmp_path, n=12, levels=(1, 3))
    with ws.manifest() as m:
        rows = m.frame(["id", "path", "split"], where="split = 'train'")
    ws.resolve(rows.path[0]).unlink()  # missing on disk
    ws.resolve(rows.path[1]).write_bytes(b"\xff\xd8 not really a jpeg")  # corrupt
    from geohier.hierarchy import Hierarchy

    h = Hierarchy.load(ws.hierarchy_path)
    ds = ManifestDataset(ws, h, "train", EvalPreset(32))
    assert ds.stats["missing"] == 1 and len(ds) == ds.stats["rows"] - 1
    assert ds.labels.shape == (len(ds), 2)
    items = [ds[i] for i in range(len(ds))]
    bad = [it for it in items if isinstance(it, Skipped)]
    assert len(bad) == 1 and "not really" not in bad[0].reason
    batch = collate(items[:4])
    assert batch.images.shape[1:] == (3, 32, 32) and len(batch.skipped) == sum(isinstance(i, Skipped) for i in items[:4])
    # a level where the point's cell was dropped is -100
    h2 = build_hierarchy(ds.lat[:3], ds.lon[:3], [1, 3], min_images=1)
    ds2 = ManifestDataset(ws, h2, "train", EvalPreset(32), check_files=False)
    assert (ds2.labels == IGNORE_INDEX).any()
    w = ds.sample_weights()
    assert w.shape == (len(ds),) and np.all(w > 0)


# ----------------------------------------------------------------------------- runs


def test_short_run_beats_chance_and_writes_the_run_directory(world):
    run = T.train(world, tiny(epochs=3, lr=1e-3, run_name="easy"))
    assert run == world.models_dir / "easy"
    for name in ("config.json", "status.json", "log.txt", "metrics.jsonl", "model.safetensors", "meta.json"):
        assert (run / name).exists(), name
    st = status(run)
    assert st["state"] == "done" and st["progress"] == 1.0 and st["epoch"] == 3
    ms = metrics(run)
    assert [m["epoch"] for m in ms] == [1, 2, 3]
    last = ms[-1]
    assert set(last) >= {"epoch", "train_loss", "val_loss", "lr", "time_s", "train", "val", "val_km"}
    assert set(last["val"]["1"]) == {"top1", "top5", "top10"}
    assert last["val"]["1"]["top1"] > 0.5  # chance is 0.25: the quadrants are coloured
    assert "median_km" in last["val_km"]
    model, meta = load_run(run)
    assert meta["arch"]["levels"] == [1, 3] and meta["input"]["image_size"] == 32
    assert len(meta["cell_positions"]["3"]) == meta["arch"]["num_classes"]["3"]
    assert meta["training"]["state"] == "done"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["backbone"] == "resnet18" and cfg["hierarchy_hash"] == meta["hierarchy_hash"]


def test_resume_continues_the_epoch_count_and_refuses_a_changed_hierarchy(tmp_path):
    ws = make_world(tmp_path, n=24)
    run = T.train(ws, tiny(epochs=1, max_steps=1, run_name="r"))
    assert [m["epoch"] for m in metrics(run)] == [1]
    state = json.loads((run / "train_state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == 1
    assert state["scheduler"] == {"last_epoch": 1, "base_lrs": [2e-3, 2e-3]}
    # the run owns its split: a relabel of the manifest in between does not move it
    from geohier import splits

    own = splits.of_run(run, ws)
    assert own.hash == json.loads((run / "config.json").read_text())["split"]["hash"]
    assert own.counts() == {"train": 20, "val": 4, "test": 0}
    with ws.manifest() as m:
        m.conn.execute("UPDATE images SET split = 'val'")
    T.resume(ws, run, epochs=2)
    assert splits.of_run(run, ws).hash == own.hash != splits.current(ws).hash
    assert load_run(run)[1]["split"]["hash"] == own.hash
    assert [m["epoch"] for m in metrics(run)] == [1, 2]
    assert status(run)["state"] == "done" and status(run)["epoch"] == 2
    assert json.loads((run / "train_state.json").read_text())["step"] == 2
    # the schedule of the longer run (2 steps, no warm-up) was restored at step 1: its end
    assert metrics(run)[-1]["lr"] == pytest.approx(2e-3 * T.warmup_cosine(1, 2, 0))
    with pytest.raises(GeohierError, match="already exists"):
        T.train(ws, tiny(run_name="r"))
    build_hierarchy([1, 2, -3], [4, 5, -6], [1, 3], min_images=1).save(ws.hierarchy_path)
    with pytest.raises(GeohierError, match="hierarchy changed"):
        T.resume(ws, run, epochs=3)


def test_bad_input_messages(tmp_path):
    ws = make_world(tmp_path, n=12)
    with pytest.raises(GeohierError, match="not in hierarchy.json"):
        T.train(ws, tiny(levels=[2]))
    with pytest.raises(GeohierError, match="--batch-size"):
        T.train(ws, tiny(batch_size=0))
    with pytest.raises(GeohierError, match="unknown backbone"):
        T.train(ws, tiny(backbone="alexnet"))
    with ws.manifest() as m:
        ids = m.frame(["id"]).id.tolist()
        m.set_splits(dict.fromkeys(ids, "test"))
    with pytest.raises(GeohierError, match="train split has no usable image"):
        T.train(ws, tiny(run_name="empty"))
    assert status(ws.models_dir / "empty")["state"] == "failed"
    build_hierarchy([10, 11], [10, 11], [1, 3], min_images=1).save(ws.hierarchy_path)
    with pytest.raises(GeohierError, match="level 1 has 1 class; .*--min-images"):
        T.train(ws, tiny())


def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path):
    ws = make_world(tmp_path, n=24)
    with ws.manifest() as m:
        rows = m.frame(["path"], where="split = 'train'")
    for p in rows.path[:2]:
        ws.resolve(p).unlink()
    ws.resolve(rows.path[2]).write_bytes(b"garbage")
    run = T.train(ws, tiny(run_name="holes", batch_size=6))  # 18 usable images: no batch dropped
    st = status(run)
    assert st["state"] == "done"
    assert st["skipped"] == {"missing": 2, "unreadable": 1}
    assert metrics(run)[-1]["skipped"] == {"missing": 2, "unreadable": 1}
    assert "missing on disk" in (run / "log.txt").read_text()


def test_out_of_memory_says_what_to_lower(world, monkeypatch):
    from pipeline.train import fit

    real = fit.build_model

    def oom_model(*a, **k):
        m = real(*a, **k)

        def boom(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        m.forward = boom
        return m

    monkeypatch.setattr("pipeline.train.fit.build_model", oom_model)
    with pytest.raises(GeohierError, match=r"out of memory .*lower --batch-size or --image-size"):
        T.train(world, tiny(run_name="oom"))
    assert status(world.models_dir / "oom")["state"] == "failed"


def test_options_per_level_balanced_mixing_haversine(world):
    runs = T.train_runs(world, tiny(per_level=True, run_name="seedshape", max_steps=2, balanced=True,
                                    mixup=0.2, cutmix=1.0, haversine_tau=2000.0, randaugment=True,
                                    level_weights={1: 1.0, 3: 0.5}))
    assert [r.name for r in runs] == ["seedshape-L1", "seedshape-L3"]
    hashes = set()
    for r, lv in zip(runs, (1, 3), strict=True):
        model, meta = load_run(r)
        assert meta["arch"]["levels"] == [lv] and meta["config"]["group"] == "seedshape"
        hashes.add(meta["hierarchy_hash"])
    assert len(hashes) == 1
    group = world.models_dir / "seedshape"
    assert status(group)["state"] == "done"
    assert json.loads((group / "config.json").read_text())["runs"] == ["seedshape-L1", "seedshape-L3"]


def test_demo_preset_from_the_command_line():
    args = T.get_args_parser().parse_args(["--preset", "demo", "--epochs", "2"])
    cfg = T.config_from_args(args)
    assert cfg.backbone == "resnet18" and cfg.weights == "none" and cfg.image_size == 64 and cfg.epochs == 2
    args = T.get_args_parser().parse_args(["--levels", "1,3", "--level-weights", "1,0.5", "--no-amp"])
    cfg = T.config_from_args(args)
    assert cfg.levels == [1, 3] and cfg.level_weights == {1: 1.0, 3: 0.5} and cfg.amp is False
    assert cfg.hflip == 0.0 and cfg.backbone == "resnet50"


# ----------------------------------------------------------------------------- processes


def _env(ws: Workspace) -> dict:
    env = dict(os.environ, GEOHIER_DATA=str(ws.data_dir), GEOHIER_MODELS=str(ws.models_dir),
               OMP_NUM_THREADS="1")
    return env


TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4",
             "--workers", "0", "--device", "cpu", "--warmup-epochs", "0", "--threads", "1"]


def test_sigterm_saves_and_ends_as_cancelled(world):
    run = world.models_dir / "sig"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *TINY_ARGS, "--epochs", "50",
                             "--run-name", "sig"], cwd=ROOT, env=_env(world),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                st = status(run)
            except (OSError, ValueError):
                st = {}
            if st.get("state") == "running":
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()[-2000:]
    st = status(run)
    assert st["state"] == "cancelled" and st["error"] is None
    assert (run / "model.safetensors").exists() and (run / "train_state.json").exists()
    assert "SIGTERM" in (run / "log.txt").read_text()
    load_run(run)


def test_torchrun_two_processes_rank0_alone_writes(tmp_path):
    ws = make_world(tmp_path, n=24)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.train", *TINY_ARGS, "--epochs", "2", "--max-steps", "1", "--levels", "1"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(ws), capture_output=True, timeout=180)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    runs = [p for p in ws.models_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1  # both ranks agreed on one run directory
    run = runs[0]
    st = status(run)
    assert st["state"] == "done" and st["world_size"] == 2
    assert [m["epoch"] for m in metrics(run)] == [1, 2]  # one line per epoch, not one per rank
    assert (run / "log.txt").read_text().count("starting run") == 1
    assert metrics(run)[-1]["step"] == 2  # 1 step per epoch on each rank, in lock-step
    load_run(run)
