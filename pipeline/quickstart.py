"""``python -m pipeline quickstart``: make a fresh workspace usable in one go.

`make run` calls it before starting the dashboard: it builds the synthetic demo world when
the manifest is empty, the label hierarchy when there is none, trains the small demo model
when no run has finished, and evaluates the newest finished run when it has no evaluation —
each step only when missing, so it costs nothing once done.
``next_step`` tells the home page what a user should do next.
"""

from __future__ import annotations

from geohier.runs import finished_runs
from geohier.workspace import Workspace


def _image_count(ws: Workspace) -> int:
    if not ws.has_manifest():
        return 0
    with ws.manifest() as m:
        return m.count()


def next_step(ws: Workspace) -> dict:
    """What a user of this workspace should do next: {"text": ..., "command": ...}."""
    if _image_count(ws) == 0:
        return {"text": "The workspace has no images. Build the offline demo world (a minute), import "
                        "your own geotagged photos, or fetch from Mapillary on the Data page.",
                "command": "python -m pipeline demo   # or: import-photos DIR | fetch --cells ..."}
    if not ws.hierarchy_path.exists():
        return {"text": "Images are in. Build the label hierarchy and the train/val/test splits.",
                "command": "python -m pipeline labels --levels 1,3,5,8"}
    if not finished_runs(ws.models_dir):
        return {"text": "Labels are ready. Train a model on the Train page, or from the shell.",
                "command": "python -m pipeline train --backbone resnet18 --image-size 96 --epochs 5"}
    return {"text": "A trained run is ready: drop a photo on the Predict page, or compare runs on the "
                    "Accuracy page.",
            "command": "python -m pipeline predict photo.jpg --json"}


def quickstart(ws: Workspace, images: int | None = None, train: bool = True) -> list[str]:
    """Build whatever of demo world -> labels -> demo model is missing; return what was done."""
    done = []
    if _image_count(ws) == 0:
        from pipeline.demo import build_demo

        kwargs = {} if images is None else {"images": images}
        print("quickstart: building the synthetic demo world ...", flush=True)
        build_demo(ws, **kwargs)
        done.append("demo")
    if not ws.hierarchy_path.exists():
        from pipeline.labels import build_labels

        print("quickstart: building the label hierarchy and splits ...", flush=True)
        build_labels(ws)
        done.append("labels")
    if train and not finished_runs(ws.models_dir):
        from pipeline.train import demo_config
        from pipeline.train import train as train_run

        print("quickstart: training the demo model (a few minutes on a laptop) ...", flush=True)
        train_run(ws, demo_config())
        done.append("train")
    runs = finished_runs(ws.models_dir)
    if train and runs and runs[0].eval() is None:
        from pipeline.evaluate import evaluate_run

        print(f"quickstart: evaluating {runs[0].name} on its test split ...", flush=True)
        evaluate_run(runs[0].path, ws)
        done.append("evaluate")
    return done


def register(sub) -> None:
    p = sub.add_parser(
        "quickstart", help="build the demo world, labels and demo model where missing (make run)",
        description="Make a fresh workspace usable: each step runs only when its output is missing.")
    p.add_argument("--images", type=int, default=None, help="demo world size (default: the demo's default)")
    p.add_argument("--no-train", action="store_true", help="stop after the labels (default: train too)")
    p.set_defaults(func=_run)


def _run(args, ws: Workspace) -> int:
    done = quickstart(ws, images=args.images, train=not args.no_train)
    print("quickstart: " + (", ".join(done) + " done" if done else "workspace already complete"))
    return 0
