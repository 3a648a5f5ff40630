"""bench/scale.py runs end to end on a tiny CSV (the 5 M-row run takes most of an hour)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_scale_bench_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--rows", "3000", "--import-rows", "40",
                          "--demo-images", "60", "--pages", "home,data", "--work", str(tmp_path / "work")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("| step |"):]
    for row in ("`import-csv`, 10 / 40 rows", "`Manifest.add_rows`: 3,000 rows", "`labels` fixed 1,3,5,8, first",
                "`labels` --cells adaptive", "page Home: open / rerun", "page Data: open / rerun",
                "page Data: open the adaptive-cells expander"):
        assert row in table, table
    assert not (tmp_path / "work").exists()  # removed without --keep
