"""Real images: the 700-image CIFAR-10 mini set of ../shared/data, unpacked into a temporary
folder (never into the repo or ../shared). Skipped where the archive is not available."""
import json
import os
import tarfile

import pytest
import torch

import dino
import linear_eval
import views
from conftest import ROOT

ARCHIVE = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-mini.tar.gz")
pytestmark = pytest.mark.skipif(not os.path.exists(ARCHIVE), reason="../shared/data/cifar10-mini.tar.gz not available")


@pytest.fixture(scope="module")
def cifar_mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(root, filter="data")
    return os.path.join(root, "cifar10-mini")


def test_real_jpegs_through_the_multicrop_pipeline(cifar_mini):
    recipe = views.get_recipe("dino", "light", global_size=32)
    dataset = views.ImageFiles(os.path.join(cifar_mini, "train"), views.MultiCropTransform(recipe))
    assert len(dataset) == 500 and len(dataset.classes) == 10
    crops, label = dataset[123]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 18, 18)] * 6
    assert 0 <= label < 10 and all(c.dtype == torch.uint8 and c.float().std() > 0 for c in crops)


def test_dino_epoch_and_knn_on_real_images(cifar_mini, tmp_path):
    out = tmp_path / "run"
    flags = ["--arch", "resnet18", "--data", os.path.join(cifar_mini, "train"), "--eval-data", cifar_mini,
             "--output-dir", str(out), "--epochs", "1", "--batch-size", "50", "--workers", "0",
             "--global-size", "32", "--local-crops", "2", "--out-dim", "256", "--log-every", "5"]
    dino.main(flags)
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    # kNN, 500-image bank -> 200 val images, 10 classes: well above chance (10%), even this early.
    assert 15.0 < record["knn_top1"] <= 100.0 and record["knn_top5"] >= record["knn_top1"]
    state, info = linear_eval.read_checkpoint(str(out / "checkpoint.pth"))
    assert info["method"] == "dino" and info["arch"] == "resnet18"
    assert linear_eval.backbone_from(state, info, "resnet18").feat_dim == 512
