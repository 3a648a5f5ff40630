"""geohier.embeddings: the cache's round trip, reuse, incremental adds, changed files, bad
files, resume after a failure, the index rebuilt from the shards, two ranks under torchrun.

Every test embeds real JPEGs of a tmp workspace (24 px, distinct colours) with a tiny
seeded conv net at 16 px, so a whole embedding takes milliseconds.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, jpeg_bytes
from safetensors import safe_open
from torch import nn

from geohier import embeddings as E
from geohier.embeddings import FORMAT, EmbeddingCache, cache_key, embed, list_caches
from geohier.errors import InputError
from geohier.images import open_image
from geohier.presets import EvalPreset
from geohier.workspace import sha256_bytes

DESCRIBE = {"spec": "tiny-conv", "library": "test", "weights_sha256": "0" * 64, "feature_dim": 8,
            "preprocess": {"image_size": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                           "interpolation": "bilinear"}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one compute thread is faster
    yield
    torch.set_num_threads(old)


class Tiny(nn.Module):
    """A seeded conv net (B, 3, 16, 16) -> (B, 8) that counts its calls and can fail on one."""

    def __init__(self, fail_on: int | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.calls, self.rows, self.fail_on = 0, 0, fail_on
        self.modes: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls += 1
        self.rows += x.shape[0]
        self.modes.append((self.training, torch.is_inference_mode_enabled()))
        if self.calls == self.fail_on:
            raise RuntimeError(f"boom on batch {self.calls}")
        return self.conv(x).mean((2, 3))


def colour(i: int) -> tuple[int, int, int]:
    return ((37 * i + 20) % 256, (91 * i + 50) % 256, (53 * i + 90) % 256)


def add_images(ws, n: int, start: int = 0) -> None:
    with ws.manifest() as m:
        for i in range(start, start + n):
            m.store_image(jpeg_bytes((24, 24), colour(i)), "jpg", source="test", source_id=str(i),
                          lat=float(i), lon=float(i), split="train")


def rows(ws):
    """(ids, sha256s, absolute paths) of the manifest, as the frozen trainer reads them."""
    with ws.manifest() as m:
        f = m.frame(["id", "path", "sha256"])
    return f["id"].to_numpy(np.int64), f["sha256"].tolist(), [str(ws.resolve(p)) for p in f["path"]]


def root(ws) -> Path:
    return ws.data_dir / "embeddings"


def run(model, ws, ids, shas, paths, cache=None, **kw):
    cache = cache or EmbeddingCache.open(root(ws), DESCRIBE)
    kw = {"batch_size": 4, "progress": False, "log": lambda s: None} | kw
    return embed(model, EvalPreset(16), ids, shas, paths, cache, **kw), cache


def direct(paths, seed: int = 0) -> torch.Tensor:
    """The features computed without the cache, image by image."""
    m, pre = Tiny(seed=seed).eval(), EvalPreset(16)
    with torch.no_grad():
        return torch.cat([m(pre(open_image(p))[None]) for p in paths])


# ---------------------------------------------------------------- keys and the cache itself


def test_cache_key_is_stable_over_ordering_and_changes_with_what_produced_the_features():
    shuffled = {k: DESCRIBE[k] for k in reversed(list(DESCRIBE))}
    shuffled["preprocess"] = dict(reversed(list(DESCRIBE["preprocess"].items())))
    assert cache_key(shuffled) == cache_key(DESCRIBE)
    assert len(cache_key(DESCRIBE)) == 16 and int(cache_key(DESCRIBE), 16) >= 0
    keys = {cache_key(DESCRIBE)}
    for field, value in [("image_size", 32), ("mean", [0.5, 0.5, 0.5]), ("std", [0.5, 0.5, 0.5]),
                         ("interpolation", "bicubic")]:
        keys.add(cache_key(DESCRIBE | {"preprocess": DESCRIBE["preprocess"] | {field: value}}))
    keys.add(cache_key(DESCRIBE | {"weights_sha256": "1" * 64}))
    keys.add(cache_key(DESCRIBE | {"spec": "resnet18"}))
    assert len(keys) == 7
    # the same weights bytes under another name or path: the same features, the same cache
    assert cache_key(DESCRIBE | {"weights": "/elsewhere/w.safetensors", "source": "x"}) == cache_key(DESCRIBE)
    assert cache_key({"spec": "a", "weights": "w1"}) != cache_key({"spec": "a", "weights": "w2"})  # no hash


def test_add_get_round_trip_stores_float16_and_returns_float32(tmp_path):
    cache = EmbeddingCache.open(tmp_path, DESCRIBE)
    assert not cache.path.exists() and len(cache) == 0 and cache.dim is None  # created lazily
    feats = torch.randn(5, 8) * 3
    shas = [sha256_bytes(bytes([i])) for i in range(6)]
    cache.add(np.arange(5), shas[:5], feats)
    assert sorted(p.name for p in cache.path.iterdir() if not p.name.startswith("shard-")) == [
        "describe.json", "index.json"]
    (shard,) = cache.path.glob("shard-*.safetensors")
    with safe_open(str(shard), framework="pt") as f:
        assert f.get_tensor("features").dtype == torch.float16
        meta = f.metadata()
    assert json.loads(meta["ids"]) == [0, 1, 2, 3, 4] and json.loads(meta["sha256"]) == shas[:5]
    assert meta["format"] == FORMAT and meta["key"] == cache.key
    back = EmbeddingCache.open(tmp_path, DESCRIBE)  # from disk
    got, ok = back.get([4, 9, 0], [shas[4], shas[5], shas[0]])
    assert got.dtype == torch.float32 and got.shape == (3, 8)
    assert ok.tolist() == [True, False, True]
    torch.testing.assert_close(got[[0, 2]], feats[[4, 0]], atol=1e-2, rtol=1e-3)
    assert not got[1].any()  # absent rows are zero
    assert back.has([1, 9], [shas[1], shas[5]]).tolist() == [True, False]
    info = back.info()
    assert info["key"] == cache.key and info["n"] == 5 and info["dim"] == 8 and info["shards"] == 1
    assert info["bytes"] == shard.stat().st_size and info["describe"] == DESCRIBE
    assert info["created_at"] and info["updated_at"]
    with pytest.raises(InputError, match="size 4 for cache"):
        back.add([7], [shas[5]], torch.zeros(1, 4))
    with pytest.raises(InputError, match="not 64 hex"):
        back.has([1], ["abc"])
    with pytest.raises(InputError, match="2 image id"):
        back.get([1, 2], [shas[0]])


def test_doctests():
    assert doctest.testmod(E, optionflags=doctest.ELLIPSIS).failed == 0


# ---------------------------------------------------------------- embedding


def test_embed_round_trip_then_reuse_without_calling_the_model(ws):
    add_images(ws, 10)
    ids, shas, paths = rows(ws)
    model = Tiny()
    lines = []
    out, cache = run(model, ws, ids, shas, paths, log=lines.append)
    assert out["new"] == 10 and out["reused"] == 0 and out["unreadable"] == 0
    assert out["key"] == cache_key(DESCRIBE) and out["images_per_s"] > 0 and out["seconds"] >= 0
    assert model.calls == 3 and all(m == (False, True) for m in model.modes)  # eval + inference mode
    assert lines == [f"embedding cache {out['key']}: 0 of 10 image(s) reused from the cache, 10 to embed"]
    feats, ok = EmbeddingCache.open(root(ws), DESCRIBE).get(ids, shas)
    assert ok.all()
    torch.testing.assert_close(feats, direct(paths), atol=2e-3, rtol=2e-3)

    again, lines = Tiny(), []
    out, _ = run(again, ws, ids, shas, paths, log=lines.append)
    assert out["new"] == 0 and out["reused"] == 10 and again.calls == 0
    assert "10 of 10 image(s) reused" in lines[0]
    assert out["images_per_s"] == 0.0


def test_new_images_are_embedded_incrementally_and_a_changed_file_again(ws):
    add_images(ws, 6)
    ids, shas, paths = rows(ws)
    run(Tiny(), ws, ids, shas, paths)
    add_images(ws, 3, start=6)
    ids, shas, paths = rows(ws)
    model = Tiny()
    out, cache = run(model, ws, ids, shas, paths)
    assert (out["new"], out["reused"], model.rows) == (3, 6, 3)
    assert len(cache) == 9 and len(list(cache.path.glob("shard-*"))) == 2

    # image 2's file is replaced: new bytes, new sha256, same id
    old_feats, _ = cache.get(ids[2:3], shas[2:3])
    data = jpeg_bytes((24, 24), (250, 5, 5))
    Path(paths[2]).write_bytes(data)
    shas[2] = sha256_bytes(data)
    model = Tiny()
    out, cache = run(model, ws, ids, shas, paths)
    assert (out["new"], out["reused"], model.rows) == (1, 8, 1)
    feats, ok = EmbeddingCache.open(root(ws), DESCRIBE).get(ids, shas)
    assert ok.all()
    torch.testing.assert_close(feats[2:3], direct(paths[2:3]), atol=2e-3, rtol=2e-3)
    assert not torch.allclose(feats[2:3], old_feats, atol=1e-2)  # the old row is not what comes back


def test_unreadable_images_are_counted_and_listed_never_fatal(ws):
    add_images(ws, 5)
    ids, shas, paths = rows(ws)
    Path(paths[1]).write_bytes(b"\xff\xd8\xff this is no JPEG")
    Path(paths[3]).unlink()
    out, cache = run(Tiny(), ws, ids, shas, paths)
    assert (out["new"], out["unreadable"]) == (3, 2)
    assert len(out["unreadable_examples"]) == 2
    assert Path(paths[1]).name in out["unreadable_examples"][0]
    assert Path(paths[3]).name in out["unreadable_examples"][1]
    assert cache.has(ids, shas).tolist() == [True, False, True, False, True]
    # still missing next time, so tried again (and counted again), the rest reused
    model = Tiny()
    out, _ = run(model, ws, ids, shas, paths)
    assert (out["new"], out["reused"], out["unreadable"], model.calls) == (0, 3, 2, 0)


def test_a_failure_mid_way_keeps_what_was_embedded_and_the_rerun_does_the_rest(ws):
    add_images(ws, 11)
    ids, shas, paths = rows(ws)
    failing = Tiny(fail_on=3)
    with pytest.raises(RuntimeError, match="boom on batch 3"):
        run(failing, ws, ids, shas, paths, batch_size=2, shard_rows=2)
    cache = EmbeddingCache.open(root(ws), DESCRIBE)
    assert len(cache) == 4 and len(list(cache.path.glob("shard-*"))) == 2  # two shards of 2 rows
    assert json.loads((cache.path / "index.json").read_text())["n"] == 4 and not cache.index_stale
    model = Tiny()
    out, cache = run(model, ws, ids, shas, paths, batch_size=2, shard_rows=4)
    assert (out["new"], out["reused"], model.rows) == (7, 4, 7)
    assert sorted(len(json.loads(m)) for m in shard_ids(cache.path)) == [2, 2, 3, 4]  # 4 + 3 rows
    feats, ok = cache.get(ids, shas)
    assert ok.all()
    torch.testing.assert_close(feats, direct(paths), atol=2e-3, rtol=2e-3)


def shard_ids(path: Path) -> list[str]:
    out = []
    for p in sorted(path.glob("shard-*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out.append(f.metadata()["ids"])
    return out


def test_the_index_is_rebuilt_from_the_shards(ws):
    add_images(ws, 8)
    ids, shas, paths = rows(ws)
    _, cache = run(Tiny(), ws, ids[:6], shas[:6], paths[:6], shard_rows=3)
    (cache.path / "index.json").unlink()  # deleted by hand
    # a kill between writing a shard and the index: the shard alone is on disk
    cache.add(ids[6:], shas[6:], direct(paths[6:]), write_index=False)
    # and a killed write's temporary file
    (cache.path / ".shard-killed.safetensors.abc.tmp").write_bytes(b"half a shard")
    back = EmbeddingCache.open(root(ws), DESCRIBE)
    assert len(back) == 8 and back.info()["shards"] == 3 and back.bad_shards == {}
    feats, ok = back.get(ids, shas)
    assert ok.all()
    torch.testing.assert_close(feats, direct(paths), atol=2e-3, rtol=2e-3)
    model = Tiny()
    out, _ = run(model, ws, ids, shas, paths)
    assert out["new"] == 0 and model.calls == 0
    assert json.loads((cache.path / "index.json").read_text())["n"] == 8  # written again
    assert not list(cache.path.glob(".*.tmp"))  # the leftover went


def test_a_corrupt_shard_is_reported_and_its_images_embedded_again(ws):
    add_images(ws, 4)
    ids, shas, paths = rows(ws)
    _, cache = run(Tiny(), ws, ids, shas, paths, shard_rows=2)
    first = sorted(cache.path.glob("shard-*.safetensors"))[0]
    first.write_bytes(b"not a safetensors file")
    (cache.path / "index.json").unlink()
    back = EmbeddingCache.open(root(ws), DESCRIBE)
    assert list(back.bad_shards) == [first.name] and "cannot be read" in back.bad_shards[first.name]
    assert len(back) == 2 and back.info()["bad_shards"] == back.bad_shards
    model = Tiny()
    out, back = run(model, ws, ids, shas, paths, cache=back)
    assert (out["new"], out["reused"], model.rows) == (2, 2, 2)
    feats, ok = back.get(ids, shas)
    assert ok.all()


def test_list_caches_newest_first_and_unreadable_ones_reported(ws):
    add_images(ws, 3)
    ids, shas, paths = rows(ws)
    run(Tiny(), ws, ids, shas, paths)
    other = DESCRIBE | {"preprocess": DESCRIBE["preprocess"] | {"image_size": 12}}
    cache = EmbeddingCache.open(root(ws), other)
    embed(Tiny(), EvalPreset(12), ids[:2], shas[:2], paths[:2], cache, progress=False, log=lambda s: None)
    idx = json.loads((cache.path / "index.json").read_text())
    idx["updated_at"] = "2999-01-01T00:00:00+00:00"  # the newest, whatever the clock did
    (cache.path / "index.json").write_text(json.dumps(idx))
    (root(ws) / "junk").mkdir()
    (root(ws) / "junk" / "describe.json").write_text("{not json")
    listed = list_caches(root(ws))
    assert [c["key"] for c in listed if "error" not in c] == [cache_key(other), cache_key(DESCRIBE)]
    assert [c["n"] for c in listed if "error" not in c] == [2, 3]
    (bad,) = [c for c in listed if "error" in c]
    assert bad["key"] == "junk" and "not an embedding cache" in bad["error"]
    assert list_caches(ws.data_dir / "nowhere") == []


def test_bad_arguments_are_input_errors(ws):
    add_images(ws, 2)
    ids, shas, paths = rows(ws)
    with pytest.raises(InputError, match="give one of each"):
        run(Tiny(), ws, ids, shas, paths[:1])
    with pytest.raises(InputError, match="at least 1"):
        run(Tiny(), ws, ids, shas, paths, batch_size=0)
    with pytest.raises(InputError, match="expected \\(B, D\\)"):
        run(nn.Conv2d(3, 4, 3), ws, ids, shas, paths)


# ---------------------------------------------------------------- two ranks


RANK_SCRIPT = """
import json, sys
import torch
from geohier.embeddings import EmbeddingCache, embed
from geohier.presets import EvalPreset
from pipeline.train.distributed import setup_env, teardown
sys.path.insert(0, sys.argv[2])
from test_embeddings import Tiny

spec = json.loads(open(sys.argv[1]).read())
env = setup_env("cpu", threads=1)
assert env.distributed and torch.distributed.is_initialized()
cache = EmbeddingCache.open(spec["root"], spec["describe"])
lines = []
out = embed(Tiny(), EvalPreset(16), spec["ids"], spec["shas"], spec["paths"], cache, batch_size=2,
            shard_rows=2, progress=False, log=lines.append, env=env)
with open(spec["out"] + str(env.rank), "w") as f:
    json.dump({"out": out, "n": len(cache), "lines": lines}, f)
teardown(env)
"""


@pytest.mark.slow
def test_two_ranks_under_torchrun_each_write_their_shards_and_rank0_the_index(ws, tmp_path):
    add_images(ws, 9)
    ids, shas, paths = rows(ws)
    Path(paths[4]).write_bytes(b"corrupt")
    spec = {"root": str(root(ws)), "describe": DESCRIBE, "ids": ids.tolist(), "shas": shas, "paths": paths,
            "out": str(tmp_path / "rank")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "rank_main.py").write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "rank_main.py"), str(tmp_path / "spec.json"), str(ROOT / "tests")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1))
    for r in (r0, r1):  # the same totals on every rank
        assert (r["out"]["new"], r["out"]["reused"], r["out"]["unreadable"], r["n"]) == (8, 0, 1, 8)
        assert r["out"]["key"] == cache_key(DESCRIBE)
    assert Path(paths[4]).name in r0["out"]["unreadable_examples"][0]
    assert len(r0["lines"]) == 1 and r1["lines"] == []  # rank 0 alone logs
    cache = EmbeddingCache.open(root(ws), DESCRIBE)
    names = sorted(p.name for p in cache.path.glob("shard-*.safetensors"))
    assert {n.split("-")[2] for n in names} == {"r0", "r1"}  # each rank wrote its own
    index = json.loads((cache.path / "index.json").read_text())
    assert sorted(index["shards"]) == names and index["n"] == 8  # rank 0's index lists them all
    feats, ok = cache.get(ids, shas)
    assert ok.tolist() == [i != 4 for i in range(9)]
    good = [p for i, p in enumerate(paths) if i != 4]
    torch.testing.assert_close(feats[ok], direct(good), atol=2e-3, rtol=2e-3)
    model = Tiny()
    out, _ = run(model, ws, ids, shas, paths)  # one process, after the two
    assert (out["new"], out["reused"], model.calls) == (0, 8, 0)


def test_autocast_dtype_only_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert all(E.amp_dtype(a, cpu) is None for a in (None, "auto", "bf16", "fp16", True))
    assert E.amp_dtype("fp16", gpu) is torch.float16 and E.amp_dtype("bf16", gpu) is torch.bfloat16
    assert E.amp_dtype("none", gpu) is None and E.amp_dtype(False, gpu) is None
    with pytest.raises(InputError, match="unknown amp"):
        E.amp_dtype("fp8", gpu)
