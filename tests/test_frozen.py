"""train --frozen: the embedding cache is filled once and reused, heads train on features,
and the run predicts, evaluates and resumes like a fine-tuned one (real JPEGs, real torch)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_backbones as tb
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import COLORS, make_world, one_thread, tiny  # noqa: F401 - one_thread: an autouse fixture

from geohier.embeddings import EmbeddingCache, cache_root
from geohier.model import load_run
from geohier.presets import EvalPreset
from pipeline import train as T

pytestmark = pytest.mark.slow  # trains frozen runs, one under torchrun: `make test-fast` skips this module

ROOT = Path(__file__).resolve().parents[1]


def log_of(run: Path) -> str:
    return (run / "log.txt").read_text()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    ws = make_world(tmp_path_factory.mktemp("frozen"))
    run = T.train(ws, tiny(frozen=True, epochs=3, lr=1e-2, run_name="f1", mixup=0.2))
    return ws, run


def test_a_frozen_run_trains_heads_on_cached_features(frozen):
    ws, run = frozen
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    log = log_of(run)
    assert "0 of 48 image(s) reused from the cache, 48 to embed" in log
    assert "mixup ignored" in log
    # the checkpoint holds the heads; the backbone is the cache's copy, hard-linked
    assert set(load_file(str(run / "model.safetensors"))) == {"heads.1.weight", "heads.1.bias",
                                                               "heads.3.weight", "heads.3.bias"}
    meta = json.loads((run / "meta.json").read_text())
    key = meta["embeddings"]["key"]
    cache_copy = cache_root(ws) / key / "backbone.safetensors"
    assert os.path.samefile(run / "backbone.safetensors", cache_copy)
    assert meta["arch"]["frozen"] and meta["backbone"]["spec"] == "resnet18"
    assert meta["input"]["image_size"] == 32 and len(meta["backbone"]["weights_sha256"]) == 64
    assert meta["data"]["sources"] == {"test": 40}  # not the demo world alone: no synthetic warning
    # the heads learned the colour -> quadrant rule from the features
    assert metrics(run)[-1]["train"]["1"]["top1"] > 0.5
    # neighbours for retrieval: every train image's feature, position and finest class
    nb = load_file(str(run / "neighbours.safetensors"))
    assert max(t.shape[0] for t in nb.values()) == 40


def test_the_run_predicts_from_images_what_its_heads_say_on_the_cache(frozen):
    ws, run = frozen
    model, meta = load_run(run)
    cache = EmbeddingCache.open(cache_root(ws), meta["backbone"])
    with ws.manifest() as m:
        rows = m.frame(["id", "path", "sha256"], where="split = 'val'")
    prep = EvalPreset.from_meta(meta)
    x = torch.stack([prep(Image.open(ws.resolve(p)).convert("RGB")) for p in rows["path"]])
    feats, ok = cache.get(rows["id"].to_numpy(), list(rows["sha256"]))
    assert ok.all()
    with torch.inference_mode():
        from_images = model(x)
        from_cache = model.forward_heads(feats)
    for lv in (1, 3):  # the cache stores float16
        assert torch.allclose(from_images[lv], from_cache[lv], atol=2e-2, rtol=2e-2)
        assert torch.equal(from_images[lv].argmax(1), from_cache[lv].argmax(1))


def test_a_second_run_reuses_the_cache_and_new_images_are_embedded_incrementally(frozen, tmp_path):
    ws, first = frozen
    again = T.train(ws, tiny(frozen=True, epochs=3, lr=1e-2, run_name="f2"))
    assert "48 of 48 image(s) reused from the cache, 0 to embed" in log_of(again)
    assert [m["train_loss"] for m in metrics(again)] == [m["train_loss"] for m in metrics(first)]
    with ws.manifest() as m:
        new = {}
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), COLORS[i]).save(buf, "JPEG")
            new[m.store_image(buf.getvalue(), "jpg", source="test", source_id=f"new{i}", lat=40.0 + i,
                              lon=-100.0)] = "train"
        m.set_splits(new)
    third = T.train(ws, tiny(frozen=True, epochs=1, run_name="f3"))
    assert "48 of 51 image(s) reused from the cache, 3 to embed" in log_of(third)


def test_a_frozen_run_evaluates_and_predicts(frozen):
    from geohier.predictor import Predictor
    from pipeline.evaluate import evaluate_run

    ws, run = frozen
    result = evaluate_run(run, ws, split="val", progress=False)
    assert result["images"] == 8 and result["per_level"]["1"]["top1"] > 0.5
    with ws.manifest() as m:
        path = ws.resolve(m.frame(["path"], where="split = 'val'")["path"].iloc[0])
    pred = Predictor.load(run).predict_files([path])[0]
    assert pred.error is None and pred.best is not None


def test_balanced_sampling_applies_to_features(frozen):
    ws, _ = frozen
    run = T.train(ws, tiny(frozen=True, epochs=1, run_name="bal", balanced=True))
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    from pipeline.train.frozen import FeatureLoader, FeatureSet
    from pipeline.train.samplers import BalancedSampler

    labels = np.array([[0]] * 9 + [[1]])  # one image of class 1 among ten
    fs = FeatureSet(torch.zeros(10, 2), labels, np.zeros(10), np.zeros(10))
    w = 1.0 / np.bincount(labels[:, 0])[labels[:, 0]]
    loader = FeatureLoader(fs, 5, shuffle=True, sampler=BalancedSampler(w, seed=0))
    drawn = []
    for epoch in range(200):
        loader.set_epoch(epoch)
        drawn += [int(b.labels[i, 0]) for b in loader for i in range(len(b.labels))]
    assert 0.4 < np.mean(drawn) < 0.6  # class 1 drawn half the time, not a tenth


def test_run_names_of_foundation_specs_are_folder_names():
    from geohier.backbones import short_name

    assert short_name("hf:openai/clip-vit-base-patch16@main") == "clip-vit-base-patch16"
    assert short_name("open_clip:ViT-B-32/laion2b_s34b_b79k") == "ViT-B-32-laion2b_s34b_b79k"
    assert short_name("hf:/home/me/models/my clip/") == "my-clip"
    from pipeline.train.config import job_run_name

    assert job_run_name(tiny(backbone="hf:openai/clip-vit-base-patch16")).startswith("clip-vit-base-patch16-")


def test_a_frozen_run_resumes_for_more_epochs(tmp_path):
    ws = make_world(tmp_path, n=24)
    run = T.train(ws, tiny(frozen=True, epochs=1, run_name="r"))
    T.resume(ws, run, epochs=2)
    assert [m["epoch"] for m in metrics(run)] == [1, 2]
    assert "resumed after epoch 1" in log_of(run) and "24 of 24 image(s) reused" in log_of(run)
    load_run(run)


def test_frozen_foundation_backbone_from_the_command_line(tmp_path):
    """`pipeline train --frozen --backbone hf:DIR`: a tiny CLIP folder, no download."""
    ws = make_world(tmp_path, n=24)
    spec = f"hf:{tb.hf_clip(tmp_path)}"
    env = {**os.environ, "GEOHIER_DATA": str(ws.data_dir), "GEOHIER_MODELS": str(ws.models_dir),
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline", "train", "--frozen", "--backbone", spec, "--weights", "pretrained",
           "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
           "--threads", "1", "--run-name", "clip"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = ws.models_dir / "clip"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["backbone"]["library"] == "hf" and meta["input"]["interpolation"] == "bicubic"
    assert meta["input"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    model, _ = load_run(run)
    assert model.feature_dim == 32
    bad = subprocess.run(cmd[:6] + ["hf:/no/such/folder", "--run-name", "x"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_frozen_under_torchrun_embeds_once_and_trains_in_lock_step(tmp_path):
    ws = make_world(tmp_path, n=24)
    env = {**os.environ, "GEOHIER_DATA": str(ws.data_dir), "GEOHIER_MODELS": str(ws.models_dir),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.train", "--frozen", "--backbone", "resnet18", "--weights", "none", "--image-size", "32",
           "--epochs", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--threads", "1",
           "--run-name", "ddp"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = ws.models_dir / "ddp"
    assert json.loads((run / "status.json").read_text())["world_size"] == 2
    assert [m["epoch"] for m in metrics(run)] == [1, 2]
    assert log_of(run).count("to embed") == 1
    caches = [p for p in cache_root(ws).iterdir() if p.is_dir()]
    assert len(caches) == 1
    cache = EmbeddingCache.load(caches[0])
    assert len(cache) == 24 and cache.info()["shards"] == 2  # each rank embedded its half into its own shard
    load_run(run)
    assert np.isfinite(metrics(run)[-1]["train_loss"])
