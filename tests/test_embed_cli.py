"""``python -m pipeline embed``: the summary, reuse on a second run, unreadable files, the
one-line errors (exit 2) a user can cause, and two processes under torchrun.

The backbone is a torchvision resnet18 at 32 px with weights from a local .safetensors
file (random but fixed: weights ``none`` would be a new random net, so a new cache, on
every run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, jpeg_bytes

from geohier.embeddings import EmbeddingCache, cache_root, list_caches
from pipeline.cli import main

pytestmark = pytest.mark.slow  # embeds with tiny backbones in subprocesses: `make test-fast` skips this module


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)  # the command sets its own (--threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from geohier.backbones import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("resnet18", weights="none", image_size=32, download=False)
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in bb.net.state_dict().items()}, str(path))
    return path


def fill(ws, n: int = 6, split: str | None = "train") -> list[Path]:
    with ws.manifest() as m:
        ids = [m.store_image(jpeg_bytes((40, 30), (30 * i, 90, 200 - 20 * i)), "jpg", source="test",
                             source_id=str(i), lat=float(i), lon=float(i)) for i in range(n)]
        if split:
            m.set_splits({i: split for i in ids})
        f = m.frame(["path"])
    return [ws.resolve(p) for p in f["path"]]


def args(weights: Path, *extra: str) -> list[str]:
    return ["embed", "--backbone", "resnet18", "--weights", str(weights), "--image-size", "32",
            "--device", "cpu", "--workers", "0", "--threads", "1", "--batch-size", "4", *extra]


def one_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_embed_prints_a_summary_and_a_second_run_reuses_the_cache(ws, weights, capsys):
    paths = fill(ws)
    paths[2].write_bytes(b"\xff\xd8\xff not a JPEG")
    assert main(args(weights)) == 0
    cap = capsys.readouterr()
    (info,) = list_caches(cache_root(ws))
    key = info["key"]
    assert f"embedding cache {key}: resnet18" in cap.out and "512-d features" in cap.out
    assert "6 image(s): 5 new, 0 reused from the cache, 1 unreadable" in cap.out
    assert f"unreadable: {paths[2]}" in cap.out and "img/s" in cap.out
    assert f"cache dir {cache_root(ws) / key}: 5 image(s), 1 shard(s)" in cap.out
    assert "0 of 6 image(s) reused from the cache, 6 to embed" in cap.err
    assert info["n"] == 5 and info["dim"] == 512 and info["describe"]["preprocess"]["image_size"] == 32

    assert main(args(weights, "--json")) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert (out["key"], out["new"], out["reused"], out["unreadable"]) == (key, 0, 5, 1)
    assert "5 of 6 image(s) reused from the cache" in cap.err

    # the same weights bytes elsewhere: the same cache (keyed by their hash, not their path)
    moved = ws.data_dir.parent / "moved.safetensors"
    moved.write_bytes(weights.read_bytes())
    assert main(args(moved, "--json")) == 0
    assert json.loads(capsys.readouterr().out)["key"] == key

    # another image size: another cache, with only the first 3 images
    assert main(args(weights, "--json", "--limit", "3", "--image-size", "48")) == 0  # the last one counts
    other = json.loads(capsys.readouterr().out)
    assert other["key"] != key and (other["new"], other["unreadable"]) == (2, 1)  # image 2 is corrupt
    assert len(list_caches(cache_root(ws))) == 2


def test_splits_select_the_images(ws, weights, capsys):
    fill(ws, 3, split=None)
    msg = one_error(capsys, args(weights))
    assert "no images in split(s) train, val, test" in msg and "--splits all" in msg
    assert main(args(weights, "--splits", "all", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["new"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--backbone", "resnet9000"], "error: unknown backbone 'resnet9000'"),
    (["--backbone", "hf:nothing"], "hub model is ORG/NAME"),
    (["--splits", "train,holdout"], "unknown split(s) holdout"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--weights", "/nowhere/w.safetensors"], "weights file /nowhere/w.safetensors does not exist"),
])
def test_user_errors_are_one_line_and_exit_2(ws, weights, capsys, extra, message):
    fill(ws, 2)
    assert message in one_error(capsys, args(weights, *extra))


def test_a_workspace_without_a_manifest_is_one_line(ws, weights, capsys):
    msg = one_error(capsys, args(weights))
    assert msg.startswith(f"error: no manifest in {ws.data_dir}")
    assert not (ws.data_dir / "embeddings").exists()


@pytest.mark.slow
def test_torchrun_two_processes_embed_their_shares(ws, weights):
    fill(ws, 7)
    env = dict(os.environ, GEOHIER_DATA=str(ws.data_dir), GEOHIER_MODELS=str(ws.models_dir),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline", *args(weights, "--batch-size", "2", "--shard-rows", "2")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    out = res.stdout.decode()
    assert out.count("embedding cache") == 1  # rank 0 alone prints the summary
    assert "7 image(s): 7 new, 0 reused from the cache, 0 unreadable" in out
    (info,) = list_caches(cache_root(ws))
    cache = EmbeddingCache.load(info["path"])
    ranks = {p.name.split("-")[2] for p in cache.path.glob("shard-*.safetensors")}
    assert len(cache) == 7 and ranks == {"r0", "r1"} and cache.index_stale is False
