"""tests/gpu_check.py, the one command of a GPU machine: its smoke mode runs every stage on the CPU
at tiny sizes, so that the rare GPU run cannot fail on a typo."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, subprocess_env

sys.path.insert(0, os.path.join(ROOT, "tests"))
import gpu_check  # noqa: E402

# Commands per stage: the tiny folder and the ImageNet-sized JPEGs, env, the cuda tests and the
# NCCL one, 5 networks, 2 end-to-end arms and the per-part costs, 2 recipes, 3 scripts x 2 AMP
# modes, 1 compiled step.
EXPECTED = dict(data=2, env=1, tests=2, step=5, e2e=3, pretrain=2, scripts=6, compile=1)


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
    timed = [r for r in rows if r["stage"] in ("step", "compile") or "-> loss" in r["what"]]
    assert len(timed) == 8 and all(r["img_per_s"] > 0 for r in timed)
    assert all(r["img_per_s"] is None for r in rows if r["stage"] == "scripts")  # a shared GPU
    assert all(len(r["knn_curve"]) == 2 for r in rows if r["stage"] == "pretrain")  # epochs 0, 1
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("|")]
    assert table[0] == "| stage | what | settings | result | img/s | peak GiB | status |"
    assert len(table) == 2 + len(rows) and (out / "gpu_check.log").stat().st_size > 0
    assert "; commit " in summary.splitlines()[2] and ", torch " in summary.splitlines()[2]


def test_helpers():
    # pytest -v's lines of the tests that ended, also in the output of a run killed mid-test
    output = ("tests/a.py::test_x[bf16] PASSED    [ 25%]\ntests/a.py::test_y FAILED   [ 50%]\n"
              "tests/b.py::test_z SKIPPED (no CUDA device)   [ 75%]\ntests/b.py::test_w ")
    assert gpu_check.pytest_results(output) == {
        "tests/a.py::test_x[bf16]": "PASSED", "tests/a.py::test_y": "FAILED",
        "tests/b.py::test_z": "SKIPPED"}
    assert gpu_check.clean("epoch 1:  10%\repoch 1: 100%\ndone") == "epoch 1: 100%\ndone"
    # Both arms in the time left with a margin each, one epoch at least.
    for seconds in (76, 95, 130, 400):
        epochs = gpu_check.pretrain_epochs(seconds)
        arm = gpu_check.PRETRAIN_OVERHEAD_S + epochs * gpu_check.PRETRAIN_EPOCH_S
        assert 2 * (arm + gpu_check.PRETRAIN_MARGIN_S) <= seconds
    assert gpu_check.pretrain_epochs(95) == 2 and gpu_check.pretrain_epochs(10) == 1


def test_the_budgets_fit_the_total_with_a_margin():
    """The stages, data first, in the order of the schedule; their sum leaves >= 30 s of the 9
    minutes; env has room for a first CUDA start and the compile stage for one cold compile."""
    budgets = gpu_check.BUDGETS
    assert list(budgets) == list(gpu_check.STAGES) and list(budgets)[0] == "data"
    assert sum(budgets.values()) <= gpu_check.TOTAL_S - 30 and gpu_check.TOTAL_S <= 9 * 60
    assert budgets["env"] >= 40 and budgets["compile"] >= 120
    assert gpu_check.get_args_parser().parse_args(["--out", "x"]).budget is None  # = the sum


def test_the_tests_stage_runs_the_cuda_tests_and_nccl_apart(tmp_path, monkeypatch):
    """-m cuda (no slow compile tests), -v: a line per result; the NCCL test in a run of its own
    on the stage's last NCCL_S seconds."""
    check = gpu_check.Check(str(tmp_path), smoke=False, budget=600)
    calls = []

    def run(cmd, timeout, env=None):
        calls.append((cmd, timeout, env))
        return 124, 5.0, "tests/t.py::test_a PASSED [ 50%]\ntests/t.py::test_b "
    monkeypatch.setattr(check, "run", run)
    gpu_check.stage_tests(check, time.time() + 50, {})
    (first, first_timeout, env), (nccl, nccl_timeout, _) = calls
    for cmd in (first, nccl):
        assert cmd[cmd.index("-m", 2) + 1] == "cuda" and "-v" in cmd
        assert "slow" not in " ".join(cmd) and not env
    assert first[first.index("--deselect") + 1] == gpu_check.NCCL_TEST == nccl[-1]
    assert first_timeout <= 50 - gpu_check.NCCL_S and nccl_timeout > gpu_check.NCCL_S - 2
    # A timeout keeps the names and counts of what ended before it.
    row = check.rows[0]
    assert row["status"] == "timeout" and row["counts"] == {"passed": 1}
    assert row["result"].startswith("1 passed")


def test_a_benchmarks_json_line_counts_whatever_its_rc(tmp_path):
    """A benchmark that printed its result and then failed (or timed out) on its way out keeps
    its measurement, with its rc."""
    check = gpu_check.Check(str(tmp_path), smoke=True, budget=60)
    result = dict(mode="step", views="global 32px | 2 local 18px", arch="resnet18",
                  recipe="light", batch_size=8, amp="off", compile=False, batches=3, seconds=1.5,
                  img_per_s=16.0, peak_memory_gib=None)
    cmd = [sys.executable, "-c", f"import sys; print({json.dumps(result)!r}); sys.exit(3)"]
    gpu_check.run_benchmark(check, "step", "a network", cmd, 30)
    row = check.rows[0]
    assert row["status"] == "ok" and row["img_per_s"] == 16.0 and row["rc"] == 3
    assert "rc 3 after its result line" in row["result"]


def test_a_hang_costs_only_its_timeout(tmp_path):
    """A timeout ends the command with its children (a loader's processes), which would otherwise
    hold its output pipe open."""
    check = gpu_check.Check(str(tmp_path), smoke=True, budget=60)
    child = f"import subprocess, time; subprocess.Popen([{sys.executable!r}, '-c', " \
            "'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)"
    rc, wall, output = check.run([sys.executable, "-c", child], timeout=3)
    assert rc == 124 and wall < 15 and "started" in output
