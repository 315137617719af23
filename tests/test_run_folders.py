"""The method scripts' run folders and flags: a finished run exports from any number of processes;
nodes that see different checkpoints refuse together, before any training; another method's folder
is refused untouched; every numeric flag is checked before anything is written, one-way heads
included."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import backbones
import dino
import moco_v2
import swav
from conftest import ROOT, TinyBackbone, free_port, make_image_folder, subprocess_env

SCRIPTS = {"dino": dino, "moco": moco_v2, "swav": swav}
TINY = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--global-size", "32",
        "--local-crops", "1", "--log-every", "1"]
HEADS = {"dino": ["--out-dim", "32"], "moco": ["--queue-size", "64"],
         "swav": ["--num-prototypes", "16", "--hidden-dim", "32", "--feat-dim", "16",
                  "--queue-length", "0"]}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A finished 1-epoch run of each method on 1 process (8 images, a 2-layer CNN backbone)."""
    root = tmp_path_factory.mktemp("runs")
    data = make_image_folder(root / "images", n_per_class=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbones, "build_backbone", lambda arch, **kw: TinyBackbone())
        patch.setattr(torch.cuda, "is_available", lambda: False)
        for method, script in SCRIPTS.items():
            script.main(["--data", data, "--output-dir", str(root / method), *TINY, *HEADS[method]])
    return root


def contents(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("method", SCRIPTS)
def test_a_finished_run_exports_from_any_number_of_processes(finished_runs, tmp_path, monkeypatch,
                                                             method):
    """Trained on 1 process, exported from 2 (a torchrun run exported with plain python, and back):
    only training on needs the same number of processes."""
    script, run = SCRIPTS[method], finished_runs / method
    two_processes = lambda device, seed: (0, 2, torch.device("cpu"))  # rank 0 of 2
    monkeypatch.setattr(script, "init_distributed", two_processes)
    script.main(["--output-dir", str(run), "--export", str(tmp_path / "b.pth")])
    assert torch.load(tmp_path / "b.pth")  # the backbone's weights
    before = contents(run)
    with pytest.raises(script.UserError, match=r"resume on 1 process\(es\) as trained, not 2"):
        script.main(["--output-dir", str(run), "--epochs", "2"])
    assert contents(run) == before


@pytest.mark.parametrize("method, other", [("dino", "moco"), ("dino", "swav"), ("moco", "swav"),
                                           ("swav", "dino")])
def test_another_methods_run_folder_is_refused_untouched(finished_runs, tmp_path, method, other):
    script, run = SCRIPTS[method], finished_runs / other
    before = contents(run)
    for export in ([], ["--export", str(tmp_path / "b.pth")]):
        with pytest.raises(script.UserError, match=f"holds a {other} run, not a {method} one"):
            script.main(["--output-dir", str(run), *export])
    assert contents(run) == before and not (tmp_path / "b.pth").exists()


REFUSED = {  # flags -> the start of the one-line refusal
    "dino": [(["--lr", "nan"], "--lr must be > 0 and finite"), (["--lr", "inf"], "--lr must be"),
             (["--warmup-epochs", "nan"], "--warmup-epochs must be in"),
             (["--warmup-epochs", "-1"], r"--warmup-epochs must be in \[0, 1\]"),
             (["--workers", "-1"], "--workers must be >= 0"),
             (["--out-dim", "1"], "--out-dim must be >= 2"),
             (["--momentum-teacher", "1.5"], "--momentum-teacher must be in"),
             (["--drop-path", "1"], "--drop-path"),
             (["--teacher-temp", "0"], "--teacher-temp must be > 0"),
             (["--clip-grad=-inf"], "--clip-grad"), (["--seed", "-1"], "--seed")],
    "moco": [(["--lr", "inf"], "--lr must be > 0"), (["--temperature", "nan"], "--temperature"),
             (["--workers", "-1"], "--workers must be >= 0"),
             (["--weight-decay", "nan"], "--weight-decay"),
             (["--momentum", "nan"], "--momentum must be in"), (["--min-lr", "-1"], "--min-lr")],
    "swav": [(["--num-prototypes", "1"], "--num-prototypes must be >= 2"),
             (["--lr", "nan"], "--lr"), (["--epsilon", "inf"], "--epsilon"),
             (["--start-warmup", "nan"], "--start-warmup"), (["--workers", "-1"], "--workers"),
             (["--warmup-epochs", "nan"], "--warmup-epochs")],
}


@pytest.mark.parametrize("method, flags, message",
                         [(m, f, msg) for m, cases in REFUSED.items() for f, msg in cases])
def test_numeric_flags_are_checked_before_anything_is_written(finished_runs, tmp_path, monkeypatch,
                                                              method, flags, message):
    """NaN, inf, negative counts, a one-way head (its softmax is constant, its loss exactly 0):
    one line naming the flag, and no run folder. (Tiny sizes: a flag let through trains briefly.)"""
    monkeypatch.setattr(backbones, "build_backbone", lambda arch, **kw: TinyBackbone())
    tiny = ["--data", str(finished_runs / "images"), *TINY, *HEADS[method]]
    with pytest.raises(SCRIPTS[method].UserError, match="^" + message):
        SCRIPTS[method].main([*tiny, "--output-dir", str(tmp_path / "run"), *flags])
    assert os.listdir(tmp_path) == []


def test_a_resumed_runs_flags_are_checked_too(finished_runs):
    with pytest.raises(dino.UserError, match="--workers must be >= 0"):
        dino.main(["--output-dir", str(finished_runs / "dino"), "--workers", "-1"])


def two_nodes(cwds, flags, timeout=60):
    """Two `torchrun --nnodes 2` agents on this machine (c10d rendezvous), one per folder in
    `cwds`, each running dino.py with `flags` on 1 CPU process -> their (returncode, stderr)."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--max_restarts", "0",
           os.path.join(ROOT, "dino.py"), "--device", "cpu", *flags]
    nodes = [subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for cwd in cwds]
    try:
        return [(node.communicate(timeout=timeout)[1], node.returncode)[::-1] for node in nodes]
    finally:
        for node in nodes:  # a hang (the fault this guards against) is ended, with its workers
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


def test_nodes_with_disks_of_their_own_refuse_together(finished_runs, tmp_path):
    """Node A's folder holds a finished run, node B's (the same relative --output-dir) none: both
    stop at once, in one line, instead of resuming apart and hanging out of step. (One shared
    folder: the 2-process runs of each script's torchrun test pass the same check.)"""
    node_a, node_b = tmp_path / "a", tmp_path / "b"
    node_b.mkdir()
    (node_a / "run").mkdir(parents=True)
    for name, data in contents(finished_runs / "dino").items():
        (node_a / "run" / name).write_bytes(data)
    for returncode, stderr in two_nodes([node_a, node_b], ["--output-dir", "run", "--epochs", "2"]):
        assert returncode != 0, stderr[-2000:]
        assert "error: the processes see different checkpoints in run/checkpoint.pth" in stderr
    assert os.listdir(node_b) == [] and contents(node_a / "run") == contents(finished_runs / "dino")
