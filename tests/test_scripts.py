"""tests/benchmark.py and tests/reproduce.py run (they are scripts, not collected as tests): a smoke run of each
mode on tiny inputs, no timing asserted."""
import argparse
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_image_folder, subprocess_env

sys.path.insert(0, os.path.join(ROOT, "tests"))
import benchmark  # noqa: E402


def options(**changes):
    base = dict(method="dino", arch="resnet18", recipe="light", batch_size=4, global_size=32, local_crops=2, amp="off",
                device="cpu", steps=1, warmup=1, memory_format="auto", data="synthetic", workers=0,
                views_on="loader", prefetch=1)
    return argparse.Namespace(**dict(base, **changes))


@pytest.mark.parametrize("method", ["dino", "moco", "swav"])
def test_benchmark_step_runs_each_method(method):
    result = benchmark.benchmark_step(options(method=method))
    assert result["img_per_s"] > 0 and result["method"] == method and result["amp"] == "off"


@pytest.mark.parametrize("views_on", ["loader", "device"])
def test_benchmark_data_runs_both_view_paths(tmp_path, views_on):
    data = make_image_folder(tmp_path / "images", n_per_class=4)
    result = benchmark.benchmark_data(options(data=data, views_on=views_on))
    # The loader ships uint8: 2 x 32^2 + 2 x 18^2 values per image as crops, or the decoded 32 px image alone.
    shipped = 4 * 3 * (2 * 32 * 32 + 2 * 18 * 18) if views_on == "loader" else 4 * 3 * 32 * 32
    assert result["batch_mb_shipped_uint8"] == round(shipped / 2**20, 2) and result["img_per_s"] > 0


def test_benchmark_train_runs_end_to_end(tmp_path):
    """JPEGs -> loader -> Prefetcher -> device-sampled views -> MoCo's step, for more batches than one epoch has."""
    data = make_image_folder(tmp_path / "images", n_per_class=4)
    result = benchmark.benchmark_train(options(data=data, method="moco", views_on="device", steps=2))
    assert result["img_per_s"] > 0 and result["mode"] == "train" and result["views_on"] == "device"


def test_reproduce_prints_its_commands(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "reproduce.py"), "--data", str(tmp_path),
                             "--runs", "dino:resnet18", "--dry-run"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert len(lines) == 6 and "--recipe baseline" in lines[0] and "--recipe light" in lines[3]
    assert "--mode knn" in lines[1] and "--mode linear" in lines[2]


def test_benchmark_step_under_torchrun():
    """2 CPU processes (gloo): DDP on the student, as dino.py runs it; rank 0 reports."""
    from conftest import free_port
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", os.path.join(ROOT, "tests", "benchmark.py"), "step",
                             "--method", "moco", "--device", "cpu", "--batch-size", "4", "--global-size", "32",
                             "--local-crops", "1", "--steps", "1", "--warmup", "1", "--amp", "off"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and '"processes": 2' in reports[0]
