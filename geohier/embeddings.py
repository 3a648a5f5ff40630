"""The embedding cache: a frozen backbone's features of the workspace's images, on disk.

Frozen-backbone training embeds every image once and trains small heads on the cached
features. A cache is one folder per backbone + preprocessing, named by the hash of what
produced the features (``cache_key(describe)``: spec, a content hash of the weights,
image size, mean, std, interpolation)::

    data/embeddings/<key>/
      describe.json                       what produced the features (format, key, describe)
      index.json                          which image is in which shard, row by row
      shard-<utc>-r<rank>-<rand>.safetensors
                                          "features" (N, D) float16; metadata: the rows'
                                          image ids and sha256s, the key, the dimension

Rows are found by the image's sha256 (the features depend on the bytes alone, and the
manifest keeps one row per sha256); each row also records its manifest id. An image whose
file changed has a new sha256: it is embedded again and its old row is simply never asked
for. Another backbone, other weights or another preprocessing is another key, so another
folder; caches are never mixed.

Crash safety: a shard is written to a temporary file and renamed into place, then the
index is rewritten the same way. The index is only a summary of the shards: whatever is
on disk (a shard written just before a kill, an index deleted by hand, a shard from
another process) is found again by reading the shards' headers when the cache is opened,
so a killed run loses at most the shard it was filling. Nothing is pickled: tensors are
safetensors, everything else JSON.

>>> import tempfile
>>> c = EmbeddingCache.open(Path(tempfile.mkdtemp()), {"spec": "toy", "preprocess": {"image_size": 8}})
>>> c.add([1, 2], ["a" * 64, "b" * 64], torch.ones(2, 4))
>>> feats, ok = c.get([2, 3], ["b" * 64, "c" * 64])
>>> feats.dtype, tuple(feats.shape), ok.tolist(), len(c)
(torch.float32, (2, 4), [True, False], 2)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from geohier import collective
from geohier.errors import GeohierError, InputError, WorkspaceError
from geohier.fileio import open_safetensors, write_safetensors
from geohier.progress import progress_bar
from geohier.workspace import atomic_write_text, json_safe, read_json, utcnow

FORMAT = "geohier-embeddings/1"
EMBEDDINGS_DIR = "embeddings"     # under the workspace's data directory
DESCRIBE_FILE = "describe.json"
INDEX_FILE = "index.json"
SHARD_GLOB = "shard-*.safetensors"
FEATURES = "features"             # the one tensor of a shard
FP16_MAX = 65504.0                # features beyond float16's range are clamped, not stored as inf
UNREADABLE_EXAMPLES = 5
NAMES_NOT_KEYED = ("weights", "source", "revision")  # where weights came from, when their hash is known
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def cache_root(ws) -> Path:
    """Where a workspace keeps its embedding caches: ``ws.data_dir / "embeddings"``."""
    return Path(ws.data_dir) / EMBEDDINGS_DIR


def cache_key(describe: Mapping) -> str:
    """The cache's name: 16 hex digits of the sha256 of ``describe`` (and FORMAT) as
    canonical JSON, so the order of the keys does not matter. Where ``describe`` holds a
    ``weights_sha256`` (a content hash of the weights), the names of where the weights came
    from (``weights``: a label or a file path, ``source``, ``revision``) are left out: the
    same weights give the same features, whatever they are called or wherever they lie.

    >>> cache_key({"a": 1, "b": [0.5, 2]}) == cache_key({"b": (0.5, 2), "a": 1})
    True
    >>> d = {"spec": "resnet18", "weights_sha256": "ab" * 32}
    >>> cache_key(d | {"weights": "/a/w.safetensors"}) == cache_key(d | {"weights": "/b/w.safetensors"})
    True
    """
    d = dict(describe)
    if d.get("weights_sha256"):
        for name in NAMES_NOT_KEYED:
            d.pop(name, None)
    text = json.dumps({"format": FORMAT, "describe": json_safe(d)},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _shard_name(rank: int) -> str:
    """A new shard's file name: sortable by creation time, distinct across ranks and runs."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return f"shard-{stamp}-r{int(rank)}-{secrets.token_hex(3)}.safetensors"


def _shas(shas) -> list[str]:
    out = [str(s).strip().lower() for s in shas]
    bad = [s for s in out if not _SHA_RE.match(s)]
    if bad:
        raise InputError(f"{len(bad)} image sha256(s) are not 64 hex digits, e.g. {bad[0][:70]!r}")
    return out


def _ids(ids) -> list:
    """Image ids as JSON values (numpy integers -> int)."""
    return [json_safe(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]


class EmbeddingCache:
    """The features of one backbone + preprocessing (one ``key``) for many images.

    Attributes: ``key``, ``path`` (root/<key>, created by the first ``add``),
    ``describe`` (what produced the features), ``dim`` (None until the first row),
    ``bad_shards`` ({file name: reason} of shard files that could not be read; they are
    left alone and ignored).
    """

    def __init__(self, path: Path, key: str, describe: dict):
        self.path = Path(path)
        self.key = key
        self.describe = describe
        self.dim: int | None = None
        self.created_at: str | None = None
        self.updated_at: str | None = None
        self._bad: dict[str, tuple[int, str]] = {}  # file name -> (its size, why it cannot be read)
        self.index_stale = False
        self._shards: dict[str, dict] = {}    # file name -> {"rows", "bytes", "ids", "sha256", "rank"}
        self._rows: dict[str, tuple[str, int]] = {}  # sha256 -> (shard file, row)

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, root: str | os.PathLike, describe: Mapping) -> EmbeddingCache:
        """The cache of ``describe`` under ``root`` (``ws.data_dir / "embeddings"``): its
        shards when it exists, else an empty cache whose folder the first ``add`` creates."""
        describe = json_safe(dict(describe))
        key = cache_key(describe)
        cache = cls(Path(root) / key, key, describe)
        stored = read_json(cache.path / DESCRIBE_FILE)
        if stored:
            if stored.get("key") != key or cache_key(stored.get("describe") or {}) != key:
                raise WorkspaceError(f"{cache.path / DESCRIBE_FILE} describes another cache than its "
                                     f"folder name {key}; move the folder away and embed again")
            cache.created_at = stored.get("created_at")
        cache.sync()
        return cache

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbeddingCache:
        """An existing cache folder, from its describe.json (``list_caches``, inspection)."""
        path = Path(path)
        stored = read_json(path / DESCRIBE_FILE)
        if not stored or "describe" not in stored:
            raise WorkspaceError(f"{path} is not an embedding cache: no readable {DESCRIBE_FILE}")
        if stored.get("format") != FORMAT:
            raise WorkspaceError(f"{path} is an embedding cache of format {stored.get('format')!r}; "
                                 f"this version reads {FORMAT}")
        cache = cls.open(path.parent, stored["describe"])
        if cache.key != path.name:
            raise WorkspaceError(f"{path}: its describe.json hashes to {cache.key}, not its folder name")
        return cache

    def sync(self) -> None:
        """Bring the in-memory index up to date with the folder: the index file, then any
        shard it does not list (written by a killed run, another rank or another process),
        less any shard that is gone."""
        index = read_json(self.path / INDEX_FILE)
        listed = index.get("shards") if index.get("key") == self.key else None
        listed = listed if isinstance(listed, dict) else {}
        if index.get("updated_at"):
            self.updated_at = index["updated_at"]
        files = sorted(p for p in self.path.glob(SHARD_GLOB) if p.is_file()) if self.path.is_dir() else []
        shards: dict[str, dict] = {}
        for p in files:
            size = p.stat().st_size
            known = self._shards.get(p.name) or listed.get(p.name)
            if isinstance(known, dict) and known.get("bytes") == size and self._valid(known):
                shards[p.name] = known
                continue
            if self._bad.get(p.name, (None,))[0] == size:
                continue  # already known to be unreadable
            try:
                shards[p.name] = self._read_header(p)
                self._bad.pop(p.name, None)
            except WorkspaceError as exc:
                self._bad[p.name] = (size, str(exc))
        present = {p.name for p in files}
        self._bad = {k: v for k, v in self._bad.items() if k in present}
        # the index lacks a shard, lists one that is gone, or is missing: write_index() mends it
        self.index_stale = bool(shards) and (
            set(listed) != set(shards) or any(listed[k].get("bytes") != e["bytes"] for k, e in shards.items()))
        self._set_shards(shards)

    @property
    def bad_shards(self) -> dict[str, str]:
        return {name: why for name, (_, why) in self._bad.items()}

    def _valid(self, entry: dict) -> bool:
        ids, shas, rows = entry.get("ids"), entry.get("sha256"), entry.get("rows")
        return (isinstance(ids, list) and isinstance(shas, list) and isinstance(rows, int)
                and len(ids) == len(shas) == rows and isinstance(entry.get("dim"), int))

    def _read_header(self, path: Path) -> dict:
        """A shard's index entry from its safetensors header (nothing else is read)."""
        with open_safetensors(path, WorkspaceError, f"shard {path.name} cannot be read") as f:
            meta = f.metadata() or {}
            shape = list(f.get_slice(FEATURES).get_shape())
        try:
            ids, shas = json.loads(meta["ids"]), json.loads(meta["sha256"])
            rows, dim = int(meta["rows"]), int(meta["dim"])
        except (ValueError, KeyError, TypeError) as exc:
            raise WorkspaceError(f"shard {path.name} cannot be read ({type(exc).__name__}: {exc})") from None
        if meta.get("key") != self.key:
            raise WorkspaceError(f"shard {path.name} belongs to cache {meta.get('key')!r}, not {self.key}")
        if not (isinstance(ids, list) and isinstance(shas, list) and len(ids) == len(shas) == rows
                and shape == [rows, dim]):
            raise WorkspaceError(f"shard {path.name}: its header lists {len(ids)} ids and {len(shas)} "
                                 f"sha256s for features of shape {shape}")
        return {"rows": rows, "dim": dim, "bytes": path.stat().st_size, "ids": ids, "sha256": shas,
                "rank": int(meta.get("rank", 0)), "created_at": meta.get("created_at")}

    def _set_shards(self, shards: dict[str, dict]) -> None:
        dims = {e["dim"] for e in shards.values()}
        if len(dims) > 1:
            raise WorkspaceError(f"the shards of {self.path} hold features of different sizes {sorted(dims)}; "
                                 "move the folder away and embed again")
        self._shards = shards
        self._rows = {}
        for name in sorted(shards):  # later shards win: the newest row of a sha256
            for r, sha in enumerate(shards[name]["sha256"]):
                self._rows[sha] = (name, r)
        self.dim = dims.pop() if dims else None

    # ------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._rows)

    def has(self, ids, shas) -> np.ndarray:
        """(N,) bool: whether the features of each image (its sha256) are cached."""
        shas = _shas(shas)
        _check_lengths(ids, shas)
        return np.fromiter((s in self._rows for s in shas), dtype=bool, count=len(shas))

    def get(self, ids, shas) -> tuple[torch.Tensor, np.ndarray]:
        """(features (N, D) float32, present (N,) bool); rows of absent images are zero.
        With an empty cache D is 0."""
        shas = _shas(shas)
        _check_lengths(ids, shas)
        out = torch.zeros(len(shas), self.dim or 0, dtype=torch.float32)
        present = np.zeros(len(shas), dtype=bool)
        wanted: dict[str, tuple[list[int], list[int]]] = {}
        for i, s in enumerate(shas):
            loc = self._rows.get(s)
            if loc is not None:
                dst, src = wanted.setdefault(loc[0], ([], []))
                dst.append(i)
                src.append(loc[1])
        for name, (dst, src) in wanted.items():
            with open_safetensors(self.path / name, WorkspaceError, f"shard {self.path / name} cannot be read "
                                  "(delete it and embed again to replace its rows)") as f:
                feats = f.get_tensor(FEATURES)
            out[torch.as_tensor(dst)] = feats[torch.as_tensor(src)].float()
            present[dst] = True
        return out, present

    def info(self) -> dict:
        """key, describe, n (images), dim, shards, bytes, created_at, updated_at, path,
        bad_shards (as ``list_caches`` and the Train page show them)."""
        return {"key": self.key, "describe": self.describe, "n": len(self), "dim": self.dim,
                "shards": len(self._shards), "bytes": int(sum(e["bytes"] for e in self._shards.values())),
                "created_at": self.created_at, "updated_at": self.updated_at or self.created_at,
                "path": str(self.path), "bad_shards": dict(self.bad_shards)}

    # ------------------------------------------------------------ writing

    def add(self, ids, shas, feats, *, rank: int = 0, write_index: bool = True) -> None:
        """Store the features (N, D) of N images as one new shard (float16, written
        atomically), then rewrite the index. Several ranks each call ``add`` with their own
        ``rank`` and ``write_index=False``; one of them writes the index afterwards
        (``write_index()``)."""
        shas = _shas(shas)
        ids = _ids(ids)
        _check_lengths(ids, shas)
        feats = torch.as_tensor(feats)
        if feats.ndim != 2 or feats.shape[0] != len(shas):
            raise InputError(f"features of shape {tuple(feats.shape)} for {len(shas)} image(s); "
                             "expected (N, D)")
        if not len(shas):
            return
        dim = int(feats.shape[1])
        if self.dim is not None and dim != self.dim:
            raise InputError(f"features of size {dim} for cache {self.key}, which holds size {self.dim}")
        self._write_describe()
        now = utcnow()
        half = feats.detach().to("cpu", torch.float32).clamp(-FP16_MAX, FP16_MAX).to(torch.float16).contiguous()
        meta = {"format": FORMAT, "key": self.key, "rows": str(len(shas)), "dim": str(dim),
                "rank": str(int(rank)), "created_at": now,
                "ids": json.dumps(ids, separators=(",", ":")), "sha256": json.dumps(shas, separators=(",", ":"))}
        path = self.path / _shard_name(rank)
        write_safetensors(path, {FEATURES: half}, metadata=meta)
        self._shards[path.name] = {"rows": len(shas), "dim": dim, "bytes": path.stat().st_size, "ids": ids,
                                   "sha256": shas, "rank": int(rank), "created_at": now}
        self._rows.update((sha, (path.name, r)) for r, sha in enumerate(shas))  # the newest row wins
        self.dim = dim
        self.index_stale = True
        if write_index:
            self.write_index()

    def write_index(self) -> None:
        """Rescan the folder (shards of other ranks or processes) and rewrite index.json."""
        self.sync()
        if not self._shards:
            return
        self.updated_at = utcnow()
        index = {"format": FORMAT, "key": self.key, "dim": self.dim, "n": len(self),
                 "updated_at": self.updated_at, "shards": self._shards}
        atomic_write_text(self.path / INDEX_FILE, json.dumps(index, separators=(",", ":")) + "\n")
        self.index_stale = False

    def _write_describe(self) -> None:
        if (self.path / DESCRIBE_FILE).exists():
            return
        self.created_at = self.created_at or utcnow()
        atomic_write_text(self.path / DESCRIBE_FILE, json.dumps(
            {"format": FORMAT, "key": self.key, "created_at": self.created_at, "describe": self.describe},
            indent=1) + "\n")

    def clean_temporary(self) -> int:
        """Delete the temporary files of writes that were killed; returns how many. Call it
        only while no other process writes to this cache."""
        n = 0
        if self.path.is_dir():
            for p in self.path.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
        return n


def _check_lengths(ids, shas) -> None:
    if len(ids) != len(shas):
        raise InputError(f"{len(ids)} image id(s) but {len(shas)} sha256(s)")


def list_caches(root: str | os.PathLike) -> list[dict]:
    """``info()`` of every cache under ``root``, most recently updated first. A folder that
    cannot be read is listed as ``{"key", "path", "error"}`` rather than raised."""
    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            out.append(EmbeddingCache.load(d).info())
        except (GeohierError, OSError, ValueError) as exc:
            out.append({"key": d.name, "path": str(d), "error": str(exc)})
    return sorted(out, key=lambda i: i.get("updated_at") or "", reverse=True)


# ---------------------------------------------------------------- embedding images


class _Images(torch.utils.data.Dataset):
    """Decoded, preprocessed images by position; a file that does not decode comes back
    as ``(None, i, reason)`` (the loader cannot raise for one bad file)."""

    def __init__(self, paths: Sequence[str], preprocess: Callable):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from geohier.images import decode_side_for, open_image

        try:
            img = open_image(self.paths[i], max_side=decode_side_for(self.preprocess))
            return self.preprocess(img), i, None
        except (GeohierError, OSError, ValueError) as exc:  # corrupt, truncated, vanished
            return None, i, f"{self.paths[i]}: {str(exc).splitlines()[0][:200]}"


def _collate(items):
    good = [it for it in items if it[0] is not None]
    bad = [(it[1], it[2]) for it in items if it[0] is None]
    x = torch.stack([it[0] for it in good]) if good else torch.empty(0)
    return x, [it[1] for it in good], bad


def _worker_init(_):
    torch.set_num_threads(1)  # loader workers decode; the main process computes


def amp_dtype(amp, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``None`` (auto: bfloat16 on a GPU that has it, else float16;
    nothing on the CPU), ``"bf16"``, ``"fp16"``, ``"none"``/False or a torch dtype."""
    if device.type != "cuda" or amp is False or amp in ("none", "off", "fp32"):
        return None
    if isinstance(amp, torch.dtype):
        return amp
    if amp in (None, True, "auto"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    choices = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if amp not in choices:
        raise InputError(f"unknown amp {amp!r}; use auto, bf16, fp16 or none")
    return choices[amp]


def _bar(progress, total: int):
    if callable(progress):
        return progress(total=total, desc="embed", unit="img")
    # the log-friendly bar of the CLI's long commands (a line every few seconds off a terminal)
    return progress_bar(total=total, desc="embed", unit="img", disable=not progress)


def embed(model: torch.nn.Module, preprocess: Callable, ids, shas, paths, cache: EmbeddingCache, *,
          batch_size: int = 64, device: str | torch.device = "cpu", workers: int = 0, amp=None,
          shard_rows: int = 4096, progress=True, log: Callable[[str], None] = print, env=None) -> dict:
    """Embed the images the cache lacks and store them, ``shard_rows`` rows per shard.

    ``model`` maps normalised images (B, 3, S, S) to features (B, D) and runs in eval and
    inference mode, under autocast on a GPU (``amp``, see ``amp_dtype``); ``preprocess``
    turns a PIL image into (3, S, S) (``geohier.presets.EvalPreset``). Images decode
    through ``geohier.images.open_image``; one that does not is counted and skipped.
    ``progress``: a bar on stderr (True / False, or a ``progress_bar``-like factory).

    Under torchrun (``env``: a ``pipeline.train.distributed.DistEnv`` with the process
    group up) rank 0 decides what is missing, each rank embeds every world-th of it into
    its own shards, and rank 0 writes the index once all are done; every rank returns the
    same totals.

    Returns ``{"new", "reused", "unreadable", "unreadable_examples", "seconds",
    "images_per_s", "key"}``: images embedded now, images found in the cache, images that
    did not decode (up to five of them with their reason), wall time, the rate of the new
    ones.
    """
    t0 = time.perf_counter()
    rank, world = (env.rank, env.world) if collective.active(env) else (0, 1)
    main = rank == 0
    shas = _shas(shas)
    ids, paths = _ids(ids), [str(p) for p in paths]
    if not len(ids) == len(shas) == len(paths):
        raise InputError(f"{len(ids)} id(s), {len(shas)} sha256(s) and {len(paths)} path(s): "
                         "give one of each per image")
    if batch_size < 1 or shard_rows < 1:
        raise InputError(f"batch_size ({batch_size}) and shard_rows ({shard_rows}) must be at least 1")
    device = torch.device(device)
    dtype = amp_dtype(amp, device)

    if main:
        cache.sync()
        cache.clean_temporary()
        present = cache.has(ids, shas)
        first: dict[str, int] = {}
        for i, s in enumerate(shas):
            if not present[i]:
                first.setdefault(s, i)  # the same bytes twice are embedded once
        todo = sorted(first.values())
        reused = int(present.sum())
        log(f"embedding cache {cache.key}: {reused} of {len(shas)} image(s) reused from the cache, "
            f"{len(todo)} to embed")
    else:
        todo, reused = None, 0
    todo, reused = collective.broadcast((todo, reused), env)
    mine = todo[rank::world]

    new, unreadable, examples = 0, 0, []
    if mine:
        new, unreadable, examples = _embed_rows(
            model, preprocess, [ids[i] for i in mine], [shas[i] for i in mine], [paths[i] for i in mine],
            cache, batch_size=batch_size, device=device, workers=workers, dtype=dtype,
            shard_rows=shard_rows, progress=progress if main else False, rank=rank)
    if world > 1:
        collective.barrier(env)
        if main:
            cache.write_index()
        collective.barrier(env)
        cache.sync()
    elif cache.index_stale:
        cache.write_index()  # once, at the end (and for a shard a killed run did not list)
    totals = collective.gather((new, unreadable, examples), env)
    new = sum(t[0] for t in totals)
    unreadable = sum(t[1] for t in totals)
    examples = [e for t in totals for e in t[2]][:UNREADABLE_EXAMPLES]
    seconds = time.perf_counter() - t0
    return {"new": int(new), "reused": int(reused), "unreadable": int(unreadable),
            "unreadable_examples": examples, "seconds": round(seconds, 3),
            "images_per_s": round(new / seconds, 2) if new and seconds > 0 else 0.0, "key": cache.key}


def _embed_rows(model, preprocess, ids, shas, paths, cache, *, batch_size, device, workers, dtype,
                shard_rows, progress, rank) -> tuple[int, int, list[str]]:
    """One process's part of ``embed``: (embedded, unreadable, examples). Shards are
    written as they fill; the index is not (rewriting it per shard would cost time
    quadratic in the images): ``embed`` writes it at the end, and a killed run's shards
    are found again from their headers."""
    loader = torch.utils.data.DataLoader(
        _Images(paths, preprocess), batch_size=batch_size, shuffle=False, num_workers=int(workers),
        collate_fn=_collate, pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if workers else None, persistent_workers=False)
    model.eval().to(device)
    buf_idx: list[int] = []
    buf_feats: list[torch.Tensor] = []
    stored = unreadable = 0
    examples: list[str] = []

    def flush(full_only: bool = False):
        """Write the buffer as shards of ``shard_rows`` rows (and the remainder unless
        ``full_only``)."""
        nonlocal stored, buf_idx, buf_feats
        feats = torch.cat(buf_feats) if buf_feats else None
        start = 0
        while len(buf_idx) - start >= (shard_rows if full_only else 1):
            part = buf_idx[start:start + shard_rows]
            cache.add([ids[i] for i in part], [shas[i] for i in part], feats[start:start + len(part)],
                      rank=rank, write_index=False)
            stored += len(part)
            start += len(part)
        buf_idx = buf_idx[start:]
        buf_feats = [feats[start:]] if buf_idx else []

    with _bar(progress, len(paths)) as bar:
        try:
            with torch.inference_mode():
                for x, index, bad in loader:
                    unreadable += len(bad)
                    examples += [why for _, why in bad][:UNREADABLE_EXAMPLES - len(examples)]
                    if index:
                        x = x.to(device, non_blocking=True)
                        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                            f = model(x)
                        if f.ndim != 2 or f.shape[0] != len(index):
                            raise InputError(f"the backbone returned features of shape {tuple(f.shape)} for "
                                             f"{len(index)} images; expected (B, D)")
                        buf_idx += index
                        buf_feats.append(f.float().cpu())
                        if len(buf_idx) >= shard_rows:
                            flush(full_only=True)
                    bar.update(len(index) + len(bad))
        except BaseException:
            # what was embedded before the failure is kept (a kill -9 loses the buffer only)
            try:
                flush()
                if rank == 0 and cache.index_stale:
                    cache.write_index()
            except Exception:  # noqa: S110 - the original error is the one to report
                pass
            raise
        flush()
    return stored, unreadable, examples
