"""``python -m pipeline embed``: embed the manifest's images with a frozen backbone.

The features go into the workspace's embedding cache (``data/embeddings/<key>/``, see
geohier.embeddings), which ``train --frozen`` reads: embedding ahead of training is only
a way to pay the cost once, at a time of one's choosing. A second run with the same
backbone, weights and preprocessing embeds only the images added (or changed) since;
a killed run resumes where its last shard ended. Under ``torchrun --nproc_per_node N -m
pipeline embed ...`` every process embeds its share of the missing images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from geohier.backbones import PRETRAINED, parse_spec
from geohier.embeddings import INDEX_FILE, EmbeddingCache, cache_root, embed
from geohier.errors import GeohierError, InputError, WorkspaceError
from geohier.forward import DEVICE_HELP
from geohier.workspace import SPLITS, Workspace, json_safe

EPILOG = ("examples:\n"
          "  python -m pipeline embed --backbone hf:facebook/dinov2-small\n"
          "  python -m pipeline embed --backbone resnet50 --splits train --limit 1000 --batch-size 128\n"
          "  torchrun --nproc_per_node 4 -m pipeline embed --backbone open_clip:ViT-B-32/laion2b_s34b_b79k")


def parse_splits(text: str) -> list[str] | None:
    """``train,val,test`` -> the list; ``all`` -> None (every image, with a split or not)."""
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    if names == ["all"]:
        return None
    bad = [s for s in names if s not in SPLITS]
    if bad or not names:
        raise InputError(f"unknown split(s) {', '.join(bad) or repr(text)}; use a comma list of "
                         f"{', '.join(SPLITS)}, or all")
    return list(dict.fromkeys(names))


def manifest_images(ws: Workspace, splits: list[str] | None, limit: int | None = None):
    """(ids, sha256s, absolute paths) of the manifest's images in ``splits`` (None: all),
    the first ``limit`` by id."""
    if not ws.has_manifest():
        raise WorkspaceError(f"no manifest in {ws.data_dir}: import or generate images first "
                             "(python -m pipeline demo)")
    with ws.manifest() as m:
        if splits is None:
            frame = m.frame(["id", "path", "sha256"])
        else:
            frame = m.frame(["id", "path", "sha256"], f"split IN ({', '.join('?' * len(splits))})", tuple(splits))
        total = m.count()
    if frame.empty:
        which = "the manifest" if splits is None else f"split(s) {', '.join(splits)}"
        hint = (" (assign splits with python -m pipeline labels, or use --splits all)"
                if total and splits is not None else "")
        raise InputError(f"no images in {which} of {ws.manifest_path}{hint}")
    if limit:
        frame = frame.head(int(limit))
    paths = [str(ws.resolve(p)) for p in frame["path"]]
    return frame["id"].to_numpy(), frame["sha256"].tolist(), paths


def embed_workspace(ws: Workspace, backbone: str, *, weights: str = "pretrained", image_size: int | None = None,
                    splits: list[str] | tuple[str, ...] | None = SPLITS, limit: int | None = None,
                    batch_size: int = 64, device: str = "auto", workers: int = 2, threads: int | None = None,
                    amp: str = "auto", shard_rows: int = 4096, progress=True, log=None,
                    download: bool = True) -> dict:
    """Embed the images of ``splits`` with ``backbone`` into the workspace's cache (joining
    the process group under torchrun). Returns ``embed``'s result plus ``info`` (the
    cache's) and ``backbone`` (its ``describe()``)."""
    from geohier.backbones import build_backbone, check_backbone
    from geohier.presets import EvalPreset
    from pipeline.train.distributed import setup_env, teardown

    for name, v, lo in (("--batch-size", batch_size, 1), ("--workers", workers, 0), ("--shard-rows", shard_rows, 1),
                        ("--limit", limit, 1), ("--image-size", image_size, 1),
                        ("--threads", threads, 1)):
        if v is not None and int(v) < lo:
            raise InputError(f"{name} must be at least {lo}, not {v}")
    check_backbone(backbone)  # a bad spec fails here, before any process group or download
    ids, shas, paths = manifest_images(ws, None if splits is None else list(splits), limit)
    env = setup_env(device, threads=threads, workers=workers)
    try:
        if env.distributed and not env.main:
            torch_barrier()  # rank 0 downloads the weights first; the others then read its copy
        bb = build_backbone(backbone, weights=weights, image_size=image_size, download=download)
        if env.distributed and env.main:
            torch_barrier()
        preprocess = EvalPreset.from_meta({"input": bb.preprocess})
        cache = EmbeddingCache.open(cache_root(ws), bb.describe())
        say = log or (lambda line: print(line, file=sys.stderr))
        out = embed(bb, preprocess, ids, shas, paths, cache, batch_size=batch_size, device=env.device,
                    workers=workers, amp=amp, shard_rows=shard_rows, progress=progress, log=say, env=env)
        return out | {"info": cache.info(), "backbone": bb.describe(), "images": len(ids), "main": env.main}
    finally:
        teardown(env)


def torch_barrier() -> None:
    import torch

    torch.distributed.barrier()


def format_summary(out: dict) -> str:
    info, bb = out["info"], out["backbone"]
    prep = bb.get("preprocess") or {}
    lines = [f"embedding cache {out['key']}: {bb.get('spec')} (weights {bb.get('weights')}, "
             f"{prep.get('image_size')} px), {info['dim']}-d features",
             f"  {out['images']} image(s): {out['new']} new, {out['reused']} reused from the cache, "
             f"{out['unreadable']} unreadable",
             f"  {out['images_per_s']:.1f} img/s, {out['seconds']:.1f} s"]
    lines += [f"    unreadable: {e}" for e in out["unreadable_examples"]]
    lines.append(f"  cache dir {info['path']}: {info['n']} image(s), {info['shards']} shard(s), "
                 f"{info['bytes'] / 1e6:.1f} MB")
    if info.get("bad_shards"):
        lines.append(f"  {len(info['bad_shards'])} shard(s) could not be read and were ignored: "
                     + "; ".join(f"{k} ({v})" for k, v in info["bad_shards"].items()))
    return "\n".join(lines)


def register(sub) -> None:
    from argparse import RawDescriptionHelpFormatter

    p = sub.add_parser("embed", help="embed the workspace's images with a frozen backbone (the embedding cache)",
                       description=__doc__.splitlines()[0].split(": ", 1)[1], epilog=EPILOG,
                       formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, metavar="SPEC",
                   help="torchvision name, hf:ORG/NAME, open_clip:ARCH/PRETRAINED, timm:NAME, or a local directory")
    p.add_argument("--weights", default="pretrained",
                   help="pretrained (the spec's own; ImageNet for torchvision) | none | a local .safetensors file")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="input size in pixels (default: the backbone's own)")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma list of splits to embed, or all (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="embed at most the first N images (by id)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP + " (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU compute threads (default: cores / processes, less one when loader workers run)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                   help="autocast on a GPU (default: auto = bf16 where supported, else fp16; never on the CPU)")
    p.add_argument("--shard-rows", type=int, default=4096, help="images per cache shard (default: %(default)s)")
    p.add_argument("--offline", action="store_true", help="never download: use only weights already on disk")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args, ws: Workspace) -> int:
    out = embed_workspace(ws, args.backbone, weights=args.weights, image_size=args.image_size,
                          splits=parse_splits(args.splits), limit=args.limit, batch_size=args.batch_size,
                          device=args.device, workers=args.workers, threads=args.threads, amp=args.amp,
                          shard_rows=args.shard_rows, download=not args.offline)
    if out["main"]:
        print(json.dumps(json_safe(out), indent=1) if args.json else format_summary(out))
    return 0


# ----------------------------------------------------------------------------- the caches' state (Train page)

FROZEN_SPLITS = ("train", "val")  # what ``train --frozen`` embeds


def caches_version(ws: Workspace) -> tuple:
    """A value that changes whenever a cache folder of the workspace gains or loses a file
    (a shard renamed into place, a rewritten index): the Train page's cache key. Nothing is
    read but the folders' modification times."""
    root = cache_root(ws)
    if not root.is_dir():
        return ()
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        index = d / INDEX_FILE
        out.append((d.name, d.stat().st_mtime_ns, index.stat().st_mtime_ns if index.exists() else 0))
    return tuple(out)


def cache_overview(ws: Workspace, splits=FROZEN_SPLITS) -> dict:
    """The workspace's embedding caches and how much of ``splits`` each holds, from the
    caches' indexes and shard headers (no model is built, no features are read):
    ``{"images": N (the splits' images), "splits": [...], "caches": [info() + "held": how
    many of the N it holds]}``, most recently updated first. A folder that cannot be read
    is ``{"key", "path", "error"}``.

    Without a cache the images are counted, not read; with caches the splits' sha256s are
    streamed through them in chunks (``Manifest.frames``), so the memory does not grow with
    the workspace."""
    caches, loaded = [], []
    root = cache_root(ws)
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            cache = EmbeddingCache.load(d)
            loaded.append((len(caches), cache))
            caches.append(cache.info() | {"held": 0})
        except (GeohierError, OSError, ValueError) as exc:
            caches.append({"key": d.name, "path": str(d), "error": str(exc)})
    images = 0
    if ws.has_manifest():
        where, params = f"split IN ({', '.join('?' * len(splits))})", tuple(splits)
        with ws.manifest() as m:
            if not loaded:
                images = m.count(where, params)
            for part in m.frames(["id", "sha256"], where, params) if loaded else ():
                images += len(part)
                ids, shas = part["id"].tolist(), part["sha256"].tolist()
                for i, cache in loaded:
                    caches[i]["held"] += int(cache.has(ids, shas).sum())
    caches.sort(key=lambda i: i.get("updated_at") or "", reverse=True)
    return {"images": images, "splits": list(splits), "caches": caches}


def _weights_choice(weights) -> str:
    """One name per weights choice: imagenet and pretrained are one (the spec's own), a
    file is its resolved path."""
    w = str(weights or "none").strip() or "none"
    if w in PRETRAINED:
        return "pretrained"
    if w in ("none", "None"):
        return "none"
    return str(Path(w).expanduser().resolve())


def matching_caches(caches: list[dict], spec: str, weights: str, image_size: int) -> list[dict]:
    """The caches (``cache_overview``'s) that ``spec`` with ``weights`` at ``image_size``
    would reuse, as far as can be told without building the model: the same spec, input
    size and weights choice. The key itself hashes the weights' bytes, which only the run
    knows: a hub model updated since, or a weights file rewritten, embeds into a new cache
    (and the same bytes under another file name reuse this one). An InputError for a spec
    that does not parse."""
    want = str(parse_spec(spec))
    choice = _weights_choice(weights)
    out = []
    for info in caches:
        d = info.get("describe") or {}
        if "error" in info or d.get("spec") != want:
            continue
        size = (d.get("preprocess") or {}).get("image_size")
        if size == int(image_size) and _weights_choice(d.get("weights")) == choice:
            out.append(info)
    return out


def same_spec_caches(caches: list[dict], spec: str) -> list[str]:
    """"224 px, weights pretrained"-style labels of the readable caches of ``spec`` (at
    any size or weights): what the Train page lists when none matches exactly."""
    want = str(parse_spec(spec))
    labels = set()
    for info in caches:
        d = info.get("describe") or {}
        if "error" not in info and d.get("spec") == want:
            w = str(d.get("weights") or "none")
            labels.add(f"{(d.get('preprocess') or {}).get('image_size')} px, weights {Path(w).name if '/' in w else w}")
    return sorted(labels)

