"""The Train page (AppTest): prerequisites, form validation next to the fields, runs table;
the backbone spec (listed, suggested foundation specs, any other), frozen mode reaching the
job's argv, and the embedding cache panel (a cache embedded by a tiny local CLIP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_backbones as tb
import torch
from conftest import jpeg_bytes
from streamlit.testing.v1 import AppTest

from geohier.hierarchy import build_hierarchy
from pipeline import jobs

PAGE = str(Path(__file__).resolve().parents[1] / "views" / "train.py")


def _page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60)


def _hierarchy(ws):
    h = build_hierarchy([48.85, 52.52, 40.71, -33.87], [2.35, 13.40, -74.0, 151.21], (1, 3), min_images=1)
    h.save(ws.hierarchy_path)
    return h


def _by_label(widgets, label):
    return next(w for w in widgets if w.label == label)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tb.hf_clip(tmp_path_factory.mktemp("backbones"))


@pytest.fixture
def started(monkeypatch) -> list[list[str]]:
    """The argv of every job the page starts; no process is started (each run is "done",
    so the runs panel has no dead process to report)."""
    argvs: list[list[str]] = []

    def spawn(run, argv, extra_job):
        argvs.append(list(argv))
        run.write_job({"pid": None, "argv": list(argv), **extra_job})
        run.write_status({"state": "done", "epoch": 0, "epochs": 1, "progress": 1.0})

    monkeypatch.setattr(jobs, "_spawn", spawn)
    return argvs


def _other_spec(at: AppTest, spec: str) -> AppTest:
    at = _by_label(at.selectbox, "Backbone").set_value("other…").run()
    return _by_label(at.text_input, "Backbone spec").set_value(spec).run()


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _images(ws, splits: dict[str, int]) -> None:
    """Tiny JPEGs in the manifest: ``{split: how many}``."""
    i = 0
    with ws.manifest() as m:
        for split, n in splits.items():
            ids = []
            for _ in range(n):
                ids.append(m.store_image(jpeg_bytes((40, 30), (30 * i, 90, 200 - 20 * i)), "jpg", source="test",
                                         source_id=str(i), lat=float(i), lon=float(i)))
                i += 1
            m.set_splits({k: split for k in ids})


def test_no_hierarchy_says_what_to_do(ws):
    at = _page().run()
    assert not at.exception
    assert "label hierarchy" in at.info[0].value and "pipeline labels" in at.info[0].value
    assert not at.button  # no manifest: nothing to build labels from


def test_form_renders_with_hierarchy_levels(ws):
    _hierarchy(ws)
    at = _page().run()
    assert not at.exception
    levels = _by_label(at.multiselect, "Levels")
    assert levels.value == [1, 3] and levels.options == ["1", "3"]
    assert _by_label(at.selectbox, "Backbone").value == "resnet18"  # the CPU demo recipe
    assert "No runs yet." in [c.value for c in at.caption]


def test_validation_messages_next_to_fields(ws):
    _hierarchy(ws)
    at = _page().run()
    at = _by_label(at.selectbox, "Weights").set_value("local file").run()  # its file input appears
    _by_label(at.text_input, "Local weights file (.safetensors)").set_value("/nope/w.safetensors")
    _by_label(at.number_input, "Image size (px)").set_value(8)
    _by_label(at.number_input, "Epochs").set_value(0)
    _by_label(at.text_input, "Run name (optional)").set_value("bad name!")
    at = _by_label(at.button, "Launch").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any("epochs must be an integer in [1, 10000]" in e for e in errors)
    assert any("image size must be an integer in [16, 2048]" in e for e in errors)
    assert any("weights file /nope/w.safetensors does not exist" in e for e in errors)
    assert any("letters, digits" in e for e in errors)
    assert not [p for p in ws.models_dir.iterdir()]  # nothing launched


def test_runs_table_and_log(ws):
    _hierarchy(ws)
    run = ws.models_dir / "r-done"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"backbone": "resnet18", "levels": [1, 3], "epochs": 2}))
    (run / "status.json").write_text(json.dumps({"state": "done", "epoch": 2, "epochs": 2, "progress": 1.0}))
    (run / "log.txt").write_text("epoch 1/2 ok\nepoch 2/2 ok\ndone\n")
    dead = ws.models_dir / "r-dead"
    dead.mkdir()
    (dead / "config.json").write_text(json.dumps({"backbone": "resnet50", "levels": [1]}))
    (dead / "status.json").write_text(json.dumps({"state": "running", "epoch": 0, "epochs": 3,
                                                  "progress": 0.1, "pid": 2**22 + 4321}))
    (dead / "log.txt").write_text("loading data\n")
    at = _page().run()
    assert not at.exception
    df = at.dataframe[0].value
    states = dict(zip(df["run"], df["state"], strict=True))
    assert states == {"r-done": "done", "r-dead": "failed"}  # its process is gone
    assert list(df["progress"])[list(df["run"]).index("r-done")] == 1.0
    pick = _by_label(at.selectbox, "Run")
    at = pick.set_value("r-done").run()
    assert not at.exception
    assert "epoch 2/2 ok" in at.code[0].value
    assert any(b.label == "Train longer" for b in at.button)
    at = _by_label(at.selectbox, "Run").set_value("r-dead").run()
    assert any(b.label == "Resume" for b in at.button)
    assert any("ended without finishing" in e.value for e in at.error)


def test_frozen_checkbox_reaches_the_job_argv(ws, started):
    _hierarchy(ws)
    at = _page().run()
    frozen = _by_label(at.checkbox, "Frozen backbone (heads on cached embeddings)")
    assert frozen.value is False and not started
    at = frozen.check().run()
    assert not at.exception
    assert any("mixup, cutmix, hflip, RandAugment) are ignored" in c.value for c in at.caption)
    at = _by_label(at.button, "Launch").click().run()
    assert not at.exception and not [e.value for e in at.error]
    (argv,) = started
    assert "--frozen" in argv and _flag(argv, "--backbone") == "resnet18"
    assert any("Launched" in s.value for s in at.success)
    at = _by_label(at.checkbox, "Frozen backbone (heads on cached embeddings)").uncheck().run()
    _by_label(at.text_input, "Run name (optional)").set_value("fine-tuned")  # not the same second's name
    at = _by_label(at.button, "Launch").click().run()
    assert len(started) == 2 and "--frozen" not in started[1]


def test_a_suggested_foundation_spec_turns_frozen_on(ws):
    _hierarchy(ws)
    at = _page().run()
    backbone = _by_label(at.selectbox, "Backbone")
    assert "hf:facebook/dinov2-small (foundation, downloaded on first use)" in backbone.options
    assert backbone.options[-1] == "other… (any spec, or a local folder)"
    at = backbone.set_value("hf:facebook/dinov2-small").run()  # nothing is downloaded to say this
    assert not at.exception
    assert _by_label(at.checkbox, "Frozen backbone (heads on cached embeddings)").value is True
    assert _by_label(at.selectbox, "Weights").value == "pretrained"  # the CPU recipe's none: a random ViT
    assert _by_label(at.number_input, "Image size (px)").value == 224
    assert "is a foundation model, so: frozen backbone on" in at.info[0].value
    at = _by_label(at.checkbox, "Frozen backbone (heads on cached embeddings)").uncheck().run()
    assert "needs a GPU" in at.warning[0].value


@pytest.mark.slow
def test_other_spec_accepts_a_local_folder(ws, started, clip_dir):
    _hierarchy(ws)
    at = _other_spec(_page().run(), f"hf:{clip_dir}")
    assert not at.exception and not [e.value for e in at.error]
    assert _by_label(at.checkbox, "Frozen backbone (heads on cached embeddings)").value is True
    at = _by_label(at.selectbox, "Backbone").set_value("resnet18").run()  # the spec input hides...
    at = _by_label(at.selectbox, "Backbone").set_value("other…").run()
    assert _by_label(at.text_input, "Backbone spec").value == f"hf:{clip_dir}"  # ...and keeps its text
    _by_label(at.text_input, "Run name (optional)").set_value("clip-frozen")
    at = _by_label(at.button, "Launch").click().run()
    assert not at.exception and not [e.value for e in at.error]
    (argv,) = started
    assert _flag(argv, "--backbone") == f"hf:{clip_dir}" and "--frozen" in argv
    assert _flag(argv, "--weights") == "pretrained" and _flag(argv, "--run-name") == "clip-frozen"


@pytest.mark.slow
def test_a_foundation_spec_launches_without_a_run_name(ws, started, clip_dir):
    _hierarchy(ws)
    at = _other_spec(_page().run(), f"hf:{clip_dir}")
    at = _by_label(at.button, "Launch").click().run()
    assert not [e.value for e in at.error] and len(started) == 1


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    ("hf:nothing", "a hub model is ORG/NAME"),
    ("jax:vit", "unknown backbone library 'jax'"),
    ("hf:/nowhere/clip", "/nowhere/clip does not exist"),
])
def test_other_spec_rejects_a_bad_one_next_to_it(ws, started, spec, message):
    _hierarchy(ws)
    at = _other_spec(_page().run(), spec)
    assert not at.exception
    assert [e.value for e in at.error if message in e.value]  # at once, before Launch
    at = _by_label(at.button, "Launch").click().run()
    assert not at.exception
    assert [e.value for e in at.error if message in e.value]
    assert not started and not list(ws.models_dir.iterdir())  # nothing started
    assert _by_label(at.text_input, "Backbone spec").value == spec  # nothing lost


def test_cache_panel_shows_the_workspace_caches(ws, clip_dir):
    from pipeline.embed import embed_workspace

    _hierarchy(ws)
    _images(ws, {"train": 4, "val": 2, "test": 1})
    at = _other_spec(_page().run(), f"hf:{clip_dir}")
    assert "No cache of" in at.info[-1].value
    assert "the first frozen run embeds the 6 train/val images once" in at.info[-1].value
    assert not at.dataframe  # no cache table (and no runs table: no runs)

    threads = torch.get_num_threads()
    try:
        out = embed_workspace(ws, f"hf:{clip_dir}", image_size=32, splits=("train",), device="cpu", workers=0,
                              threads=1, progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    at = _by_label(at.number_input, "Image size (px)").set_value(32).run()
    assert not at.exception
    table = at.dataframe[0].value
    row = table.iloc[0]
    assert len(table) == 1 and row["spec"] == f"hf:{clip_dir}" and row["key"] == out["key"]
    assert (row["images"], row["of train/val (6)"], row["image size"], row["features"]) == (4, 4, 32, 32)
    assert ("4 of the 6 train/val images are already embedded" in at.success[0].value
            and "embeds the other 2" in at.success[0].value)
    at = _by_label(at.number_input, "Image size (px)").set_value(48).run()  # another size: another cache
    assert "No cache of" in at.info[-1].value and "This backbone has caches at 32 px" in at.info[-1].value


def test_matching_caches_by_spec_size_and_weights_choice(tmp_path):
    from pipeline.embed import matching_caches

    w = tmp_path / "w.safetensors"
    w.write_bytes(b"")

    def info(spec, size, weights):
        return {"key": f"{spec}-{size}-{weights}", "describe": {"spec": spec, "weights": weights,
                                                               "preprocess": {"image_size": size}}}

    caches = [info("resnet18", 64, "imagenet"), info("resnet18", 64, str(w)), info("resnet18", 224, "none"),
              {"key": "broken", "path": "x", "error": "no describe.json"}]
    keys = [c["key"] for c in matching_caches(caches, "resnet18", "pretrained", 64)]  # imagenet = pretrained
    assert keys == ["resnet18-64-imagenet"]
    assert [c["key"] for c in matching_caches(caches, " resnet18", str(tmp_path / "." / "w.safetensors"), 64)] \
        == [f"resnet18-64-{w}"]  # a file by its resolved path
    assert matching_caches(caches, "resnet18", "none", 64) == []
    assert matching_caches(caches, "resnet50", "imagenet", 64) == []
