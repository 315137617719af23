import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device; skipped where none is visible")
    config.addinivalue_line("markers", "slow: too slow for 2 CPU cores; runs with SSLIGHT_SLOW=1 "
                                       "(tests/gpu_check.py sets it)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        if "slow" in item.keywords and os.environ.get("SSLIGHT_SLOW") != "1":
            item.add_marker(pytest.mark.skip(reason="slow on a CPU: set SSLIGHT_SLOW=1"))


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """Tests about logic run on the CPU also on a machine with a GPU: the scripts' --device auto and
    every `torch.cuda.is_available()` see no GPU, unless the test is marked cuda."""
    if "cuda" not in request.keywords:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def make_image_folder(root, n_per_class=8, classes=("a", "b"), size=32):
    """A tiny ImageFolder of generated shapes (tests never download or read ../shared)."""
    from views import SyntheticTextures
    shapes = SyntheticTextures(10 * n_per_class, size=size)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(n_per_class):
            image, _ = shapes.render(c + 10 * i)
            image.save(os.path.join(root, name, f"{i:03d}.png"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


class TinyBackbone(nn.Module):
    """A 2-layer CNN with BN standing in for a real backbone in tests about logic."""

    def __init__(self, feat_dim=16, **unused):
        super().__init__()
        self.feat_dim, self.is_vit = feat_dim, False
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, feat_dim, 3, 2, 1), nn.BatchNorm2d(feat_dim), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(cuda=False):
    """The environment of a script run by a test: no GPU visible unless `cuda` (a test marked cuda)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_torchrun(module, out_prefix, args, nproc=2, timeout=300, cuda=False):
    """Run tests/ddp_worker.py under torchrun, on the CPU (gloo) unless `cuda` (NCCL, one GPU a
    process); returns the per-rank saved states."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", os.path.join(ROOT, "tests", "ddp_worker.py"),
           module, str(out_prefix)] + list(args)
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(cuda), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(f"{out_prefix}.rank{r}", weights_only=False) for r in range(nproc)], result


def assert_ranks_identical(ranks, names):
    """The saved modules `names` agree bit for bit between rank 0 and rank 1. BN running statistics
    are left out: SyncBatchNorm needs CUDA, so on CPU each process keeps those of its own images."""
    for name in names:
        for key, value in ranks[0][name].items():
            if "running_" not in key and "num_batches_tracked" not in key:
                assert torch.equal(value, ranks[1][name][key]), f"{name}.{key} differs between ranks"
