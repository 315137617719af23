"""benchmark.py runs and reports what it measured (a smoke test: no timing is asserted)."""
import json
import subprocess
import sys

from conftest import ROOT, make_image_folder, subprocess_env


def run_benchmark(*flags):
    result = subprocess.run([sys.executable, "benchmark.py", *flags], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_step_mode_reports_the_setting_and_a_rate():
    result = run_benchmark("step", "--method", "swav", "--arch", "resnet18", "--recipe", "light", "--batch-size", "4",
                           "--steps", "2", "--global-size", "32", "--local-crops", "2", "--log-every", "2")
    assert result["mode"] == "step" and result["method"] == "swav" and result["device"] == "cpu"
    assert "2 local 18px" in result["views"] and result["img_per_s"] > 0 and result["peak_memory_gib"] is None


def test_data_mode_reads_image_files(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    result = run_benchmark("data", "--data", folder, "--recipe", "baseline", "--workers", "0", "--batch-size", "4",
                           "--steps", "2", "--warmup", "1", "--global-size", "32")
    assert result["mode"] == "data" and "6 local 14px" in result["views"] and result["img_per_s"] > 0
