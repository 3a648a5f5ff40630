"""``python -m pipeline quickstart``: make a fresh workspace usable in one go.

`make run` calls it before starting the dashboard: it builds the synthetic demo world when
the manifest is empty, the label hierarchy when there is none, and trains the small demo
model when no run has finished — each step only when missing, so it costs nothing once done.
``next_step`` tells the home page what a user should do next.
"""

from __future__ import annotations

import json

from geohier.workspace import Workspace


def finished_runs(ws: Workspace) -> list:
    """Run directories whose status.json says done, oldest first."""
    done = []
    for run in ws.runs():
        try:
            state = json.loads((run / "status.json").read_text()).get("state")
        except (OSError, ValueError):
            continue
        if state == "done":
            done.append(run)
    return done


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
    if not finished_runs(ws):
        return {"text": "Labels are ready. Train a model on the Train page, or from the shell.",
                "command": "python -m pipeline train --backbone resnet18 --image-size 96 --epochs 5"}
    return {"text": "A trained run is ready: drop a photo on the Predict page, or compare runs on the "
                    "Accuracy page.",
            "command": "python -m pipeline predict photo.jpg --json"}
