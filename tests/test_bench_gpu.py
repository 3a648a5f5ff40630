"""bench/gpu.py on a machine without a GPU: the one-line skip, and its measuring code at toy
sizes on the CPU (``--device cpu --quick``): every row of the table, each with a number."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
RATE = re.compile(r"^\d[\d,]*(\.\d+)? (img/s|samples/s)$")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even where there is one
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    return mod


def table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """{(part number, case): [rate, vs, notes]} of the markdown table's rows."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0][:1].isdigit():
            rows[(cells[0].split()[0], cells[1])] = cells[2:]
    return rows


def test_without_cuda_it_says_so_and_exits_0():
    p = run()
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    assert lines[0].startswith("bench/gpu.py: no CUDA device (torch ")
    assert "CPU only): nothing measured" in lines[0]


def test_cpu_needs_quick():
    p = run("--device", "cpu")
    assert p.returncode == 2
    assert "--quick" in p.stderr


def test_parts_by_name_or_number():
    mod = load_script()
    assert mod.parse_parts("all") == list(mod.PARTS)
    assert mod.parse_parts("ddp,1, heads") == ["finetune", "heads", "ddp"]
    with pytest.raises(Exception, match="unknown part"):
        mod.parse_parts("gpu")


def test_a_failing_case_prints_its_row_and_the_run_goes_on(monkeypatch, capsys):
    import torch

    mod = load_script()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(mod, "train_measure", out_of_memory)
    threads = torch.get_num_threads()
    try:
        rc = mod.main(["--device", "cpu", "--quick", "--parts", "finetune,ddp"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [k[0] for k in rows] == ["1"] * 4 + ["5"] * 2, out
    for rate, _vs, _notes in rows.values():
        assert rate.startswith("error: OutOfMemoryError: CUDA out of memory"), out
    assert rc == 1 and "6 case(s) failed" in out
    assert not torch.distributed.is_initialized()  # the DDP case's group is gone


@pytest.mark.slow
def test_cpu_quick_measures_every_row():
    p = run("--device", "cpu", "--quick")
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert out.startswith("## bench/gpu.py: CPU"), out
    assert f"torch {load_torch_version()}" in out
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", out)
    cpus = os.cpu_count() or 1
    workers = sorted({w for w in (0, 2, 4, 8, cpus) if w <= cpus})
    classes = "classes 4/64/1,024/5,000"
    want = [("1", c) for c in ("fp32", "fp32 channels_last", "bf16 autocast", "bf16 autocast channels_last")] \
        + [("2", f"{w} workers") for w in workers] \
        + [("3", "fp32"), ("3", "bf16 autocast")] \
        + [("4", f"fp32, {classes}"), ("4", f"bf16 autocast, {classes}")] \
        + [("5", "plain model"), ("5", "DistributedDataParallel")]
    rows = table_rows(out)
    assert sorted(rows) == sorted(want), out
    for key in want:
        rate, vs, _notes = rows[key]
        assert RATE.match(rate), (key, rate, out)
        if key[1] == "fp32" or key[1].startswith("fp32,") or key[1] == "plain model":
            assert vs == "baseline", (key, vs)
        elif key[0] == "2":
            assert re.match(r"^loader/GPU \d+\.\d\dx$", vs), (key, vs)
        else:
            assert re.match(r"^\d+\.\d\dx$", vs), (key, vs)
    assert "gloo" in out and "case(s) failed" not in out


def load_torch_version() -> str:
    import torch

    return torch.__version__
