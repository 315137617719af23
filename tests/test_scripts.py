"""tests/benchmark.py and tests/reproduce.py run (they are scripts, not collected as tests): a smoke
run of each mode on tiny inputs, no timing asserted."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_image_folder, subprocess_env

sys.path.insert(0, os.path.join(ROOT, "tests"))
import benchmark  # noqa: E402


def options(**changes):
    """Tiny sizes and no minimum time: a smoke run of each mode, no timing asserted."""
    base = dict(method="dino", arch="resnet18", recipe="light", batch_size=4, global_size=32,
                local_crops=2, out_dim=None, amp="off", compile=False, device="cpu", steps=1,
                min_seconds=0.0, warmup=1, memory_format="auto", data="synthetic", workers=0,
                views_on="loader", prefetch=1, profile_images=8)
    return argparse.Namespace(**dict(base, **changes))


@pytest.mark.parametrize("method", ["dino", "moco"])  # SwAV: in the queue test below
def test_benchmark_step_runs_each_method(method):
    out_dim = 512 if method == "dino" else None
    result = benchmark.benchmark_step(options(method=method, out_dim=out_dim))
    assert result["img_per_s"] > 0 and result["method"] == method and result["amp"] == "off"
    # What was timed, on what, with which settings: a result stands alone in a table.
    assert result["batches"] == 1 and result["seconds"] > 0 and result["device"] == "cpu"
    assert result["torch"] == torch.__version__ and result["timed"].startswith("step:")
    assert result["head"].startswith("K 512" if method == "dino" else "dim 128")  # --out-dim


def test_benchmark_swav_step_times_the_queue_path(monkeypatch):
    """The queue starts full: every step stacks it in front of the batch in Sinkhorn."""
    import swav
    seen, assign_codes = [], swav.assign_codes

    def spy(scores, embeddings, prototypes, queue, batch, *rest):
        seen.append(queue.full())
        return assign_codes(scores, embeddings, prototypes, queue, batch, *rest)
    monkeypatch.setattr(swav, "assign_codes", spy)
    result = benchmark.benchmark_step(options(method="swav"))
    assert seen == [True, True] and result["img_per_s"] > 0  # the warm-up step and the timed one


def test_benchmark_compile_wraps_the_forward_modules(monkeypatch):
    """--compile: torch.compile of the modules each step runs forward on (recorded, not compiled:
    whether these networks compile is tested with the scripts' --compile)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(type(module).__name__)
                        or module)
    recipe = benchmark.get_recipe(options())
    for build in benchmark.STEPS.values():
        build("resnet18", recipe, 4, torch.device("cpu"), torch.contiguous_format, compile=True)
    assert compiled == ["DINONet", "DINONet", "MoCoNet", "MoCoNet", "SwAVNet"]


@pytest.mark.parametrize("method", ["dino", "moco", "swav"])
def test_benchmark_uses_the_scripts_backend_settings(monkeypatch, method):
    """--amp goes through the method script's resolve_amp (it sets cuDNN and matmul precision)."""
    script = benchmark.script(method)
    calls, resolve_amp = [], script.resolve_amp
    monkeypatch.setattr(script, "resolve_amp", lambda amp, device: calls.append(amp)
                        or resolve_amp(amp, device))
    amp, autocast, scaler = benchmark.precision(method, "bf16", torch.device("cpu"))
    assert calls == ["bf16"] and amp == "bf16" and autocast.fast_dtype == torch.bfloat16
    assert benchmark.precision(method, "auto", torch.device("cpu"))[0] == "off"


@pytest.mark.parametrize("views_on", ["loader", "device"])
def test_benchmark_data_runs_both_view_paths_over_epochs(tmp_path, views_on):
    """8 images, 2 batches of 4 per epoch: one warm-up epoch, then 4 timed batches = 2 epochs."""
    data = make_image_folder(tmp_path / "images", n_per_class=4)
    result = benchmark.benchmark_data(options(data=data, views_on=views_on, workers=1, steps=4))
    run = result["paths"][views_on]["loader_run"]
    # The loader ships uint8: 2 x 32^2 + 2 x 18^2 values per image as crops, or the 32 px image.
    shipped = 4 * 3 * (2 * 32 * 32 + 2 * 18 * 18) if views_on == "loader" else 4 * 3 * 32 * 32
    assert run["batch_mb_shipped_uint8"] == round(shipped / 2**20, 2) and run["img_per_s"] > 0
    assert run["warmup_batches"] == 2 and run["batches"] == 4 and run["epochs"] == 2
    assert result["image_set"]["count"] == 8 and result["image_set"]["longer_side_px"]["<500"] == 8


def test_benchmark_data_splits_each_paths_loader_cost(tmp_path):
    """Per path, the loader's CPU ms per image in parts that add up to it, the projection for 15
    loaders from it, and the main process's ms beside it."""
    data = make_image_folder(tmp_path / "images", n_per_class=4)
    result = benchmark.benchmark_data(options(data=data, views_on="both", profile_images=6))
    assert set(result["paths"]) == {"loader", "device"}
    for path in result["paths"].values():
        parts, total = path["loader_split_ms"], path["loader_cpu_ms_per_image"]
        assert path["images"] == 6 and set(parts) == {"decode", "views_or_resize", "to_tensor",
                                                      "collate"}
        assert abs(sum(parts.values()) - total) < 0.05 and total > 0
        assert path["projected_img_per_s"] == round(15 * 1000 / total, 1)
        assert path["main_process_cpu_ms_per_image"] > 0 and "loader_run" not in path
    assert result["paths"]["loader"]["transform"] == "MultiCropTransform"


def test_timed_epochs_start_and_stop_at_epoch_boundaries():
    """The clock starts when a new epoch is asked for, after a whole warm-up epoch, and stops at an
    epoch's end: no batch made in advance is timed, no epoch start left out."""
    events = []

    class Epochs:
        def __iter__(self):
            events.append("epoch")
            for k in range(3):
                events.append(k)
                yield k

    timing, _ = benchmark.timed_epochs(Epochs(), lambda batch: None, torch.device("cpu"),
                                       warmup=1, steps=4, min_seconds=0,
                                       on_start=lambda: events.append("clock"))
    assert events == ["epoch", 0, 1, 2, "clock"] + ["epoch", 0, 1, 2] * 2
    assert (timing["warmup_batches"], timing["batches"], timing["epochs"]) == (3, 6, 2)


def test_make_imagenet_like_has_imagenets_sizes(tmp_path):
    """50 JPEGs: the size mix's shares (1 over 1,500 px), file sizes like photos', 10 classes."""
    root = benchmark.make_imagenet_like(str(tmp_path), 50)
    info = benchmark.describe_images(os.path.join(root, "train"))
    assert info["count"] == 50 and info["longer_side_px"][">1500"] == 1
    assert info["longer_side_px"]["500"] == 50 - 1 - round(0.14 * 50)
    assert 60 < info["mean_kb"] < 400 and len(os.listdir(os.path.join(root, "train"))) == 10


def test_benchmark_train_runs_end_to_end(tmp_path):
    """JPEGs -> loader -> Prefetcher -> device-sampled views -> MoCo's step, over several epochs."""
    data = make_image_folder(tmp_path / "images", n_per_class=4)
    result = benchmark.benchmark_train(options(data=data, method="moco", views_on="device",
                                               steps=3))
    assert result["img_per_s"] > 0 and result["mode"] == "train" and result["views_on"] == "device"
    # 2 batches an epoch: the clock stops at an epoch's end, after 2 whole epochs.
    assert (result["batches"], result["epochs"]) == (4, 2) and "JPEG on disk" in result["timed"]


def test_reproduce_prints_its_commands(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "reproduce.py"),
                             "--data", str(tmp_path), "--runs", "dino:resnet18", "--dry-run"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert len(lines) == 6 and "--recipe baseline" in lines[0] and "--recipe light" in lines[3]
    assert "--mode knn" in lines[1] and "--mode linear" in lines[2]


def test_benchmark_step_under_torchrun():
    """2 CPU processes (gloo): DDP on MoCo's query encoder, as moco_v2.py runs it; rank 0 reports
    and decides when the timing stops (--min-seconds), so both run the same steps."""
    from conftest import free_port
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}",
                             os.path.join(ROOT, "tests", "benchmark.py"), "step",
                             "--method", "moco",
                             "--device", "cpu", "--batch-size", "4", "--global-size", "32",
                             "--local-crops", "1", "--steps", "1", "--warmup", "1", "--amp", "off",
                             "--min-seconds", "1"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and '"processes": 2' in reports[0]
    assert json.loads(reports[0])["batches"] % 10 == 0  # rank 0's decisions come every 10 steps
