"""The CLI installs as a package with a `geohier` command, and its light commands start
without torch (only the module of the command being run is imported)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline import cli

ROOT = Path(__file__).resolve().parents[1]

# Commands that must never import torch, with an argv that ends in --help or a one-line error.
LIGHT = [
    ["--help"],
    ["score", "--help"],
    ["score", "{tmp}/nope.csv", "--truth", "{tmp}/nope.csv"],
    ["coverage", "--help"],
    ["labels", "--help"],
    ["labels"],
    ["merge", "--help"],
    ["merge", "{tmp}/nope"],
    ["import-csv", "--help"],
    ["import-csv", "{tmp}/nope.csv", "--images-root", "{tmp}"],
    ["import-photos", "--help"],
    ["import-photos", "{tmp}/nope"],
    ["import-wds", "{tmp}/nope"],
    ["fetch", "--help"],
    ["fetch"],
]

# Runs each argv through pipeline.cli.main in one process, then reports what got imported.
PROBE = """
import json, sys
from pipeline import cli
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(cli.main(argv))
    except SystemExit as exc:
        codes.append(exc.code)
heavy = [m for m in ("torch", "torchvision", "transformers", "timm", "open_clip") if m in sys.modules]
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_the_registry_matches_the_modules():
    # the stubs --help shows come from COMMANDS: same commands, order and help lines as register()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert list(sub.choices) == list(cli.COMMANDS)
    assert {c.dest: c.help for c in sub._choices_actions} == {k: h for k, (_, h) in cli.COMMANDS.items()}
    assert {m for m, _ in cli.COMMANDS.values()} == set(cli.COMMAND_MODULES)


def test_command_of_finds_the_command_past_global_options():
    assert cli.command_of(["--data", "score", "labels"]) == "labels"  # "score" is --data's value
    assert cli.command_of(["--data=d", "import-csv", "x.csv"]) == "import-csv"
    assert cli.command_of(["--help"]) is None
    assert cli.command_of(["nosuch", "score"]) is None


def test_a_stub_command_is_replaced_by_the_real_parser_when_run(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["score", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--truth" in out  # score's own flags, not a stub's


def test_light_commands_do_not_import_torch(tmp_path):
    argvs = [["--data", str(tmp_path / "data"), "--models", str(tmp_path / "models"),
              *[a.format(tmp=tmp_path) for a in argv]] for argv in LIGHT]
    env = dict(os.environ, COLUMNS="100")
    env.pop("MAPILLARY_ACCESS_TOKEN", None)
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, check=True, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["codes"] == [0 if argv[-1] == "--help" else 2 for argv in LIGHT]
    assert "Traceback" not in out.stderr
    assert "error: no Mapillary access token" in out.stderr


def test_the_geohier_command_lists_every_command(tmp_path):
    exe = Path(sys.executable).parent / "geohier"
    if not exe.exists():
        pytest.skip("the project is not installed in this environment (make setup installs it)")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=tmp_path, check=False,
                         timeout=120, env=dict(os.environ, COLUMNS="100"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: geohier")
    for name in cli.COMMANDS:
        assert name in out.stdout
    bad = subprocess.run([str(exe), "--data", str(tmp_path / "d"), "score", str(tmp_path / "nope.csv"),
                          "--truth", str(tmp_path / "nope.csv")], capture_output=True, text=True, cwd=tmp_path,
                         check=False, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'nope.csv'}: no such file"


def test_python_dash_m_pipeline_still_works(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline", "score", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m pipeline score")


@pytest.mark.slow
def test_a_wheel_holds_both_packages_and_the_command(tmp_path):
    # built from a copy, so the working tree gets no build/ or *.egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("geohier", "pipeline"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("geohier-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("geohier/__init__.py", "geohier/workspace.py", "pipeline/cli.py", "pipeline/__main__.py",
                 "pipeline/train/__init__.py", "pipeline/demo/__init__.py"):
        assert must in names
    assert not any(n.startswith(("tests/", "views/", "bench/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "geohier = pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
