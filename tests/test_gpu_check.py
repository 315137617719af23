"""tests/gpu_check.py, the one command of a GPU session: its smoke mode runs every stage on the CPU
at tiny sizes, so that the rare GPU session cannot fail on a typo."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

sys.path.insert(0, os.path.join(ROOT, "tests"))
import gpu_check  # noqa: E402

# Commands per stage: env, the tests, 5 networks eager + 1 compiled, 4 end-to-end arms, 2 recipes,
# 3 scripts x 2 AMP modes, 3 scripts compiled; and the generated data.
EXPECTED = dict(data=1, env=1, tests=1, step=6, e2e=4, pretrain=2, scripts=6, compile=3)


@pytest.mark.slow  # about 85 s on 2 idle cores: .ci/run runs the smoke mode itself, beside the suite
def test_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), "--smoke",
                             "--out", str(out)], capture_output=True, text=True,
                            env=subprocess_env(), timeout=900)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # ok, or skipped with the reason in the result column; a failure shows its output's tail.
    bad = [r for r in rows if r["status"] != "ok"
           and not (r["status"] == "skipped" and r["result"])]
    assert result.returncode == 0 and not bad, (result.stdout[-3000:], bad)
    assert {stage: sum(r["stage"] == stage for r in rows) for stage in EXPECTED} == EXPECTED
    assert all(r["img_per_s"] > 0 for r in rows if r["stage"] in ("step", "e2e"))
    assert all(len(r["knn_curve"]) == 2 for r in rows if r["stage"] == "pretrain")  # epochs 0, 1
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("|")]
    assert table[0] == "| stage | what | settings | result | img/s | peak GiB | status |"
    assert len(table) == 2 + len(rows) and (out / "gpu_check.log").stat().st_size > 0


def test_helpers():
    assert gpu_check.pytest_counts("x\n3 passed, 2 skipped, 1 failed, 9 deselected in 80.1s\n") == \
        dict(passed=3, skipped=2, failed=1, deselected=9)
    assert gpu_check.clean("epoch 1:  10%\repoch 1: 100%\ndone") == "epoch 1: 100%\ndone"
    # Both arms in the time left, one epoch at least.
    assert gpu_check.pretrain_epochs(130) == 5 and gpu_check.pretrain_epochs(10) == 1


def test_a_hang_costs_only_its_timeout(tmp_path):
    """A timeout ends the command with its children (a loader's processes), which would otherwise
    hold its output pipe open."""
    check = gpu_check.Check(str(tmp_path), smoke=True, budget=60)
    child = f"import subprocess, time; subprocess.Popen([{sys.executable!r}, '-c', " \
            "'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)"
    rc, wall, output = check.run([sys.executable, "-c", child], timeout=3)
    assert rc == 124 and wall < 15 and "started" in output
