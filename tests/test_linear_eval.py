"""Tests of linear_eval.py: probe training, frozen backbone, kNN by hand, checkpoint loading, label subsets,
fine-tuning, the command line. Tiny data, 32 px images, CPU."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

import backbones
import dino
import linear_eval as le
import views
from conftest import ROOT, TinyBackbone, assert_ranks_identical, make_image_folder, run_torchrun, subprocess_env
from views import UserError

CPU = torch.device("cpu")
AMP_OFF = torch.autocast("cpu", enabled=False)


def uint8_images(n, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def eval_folder(root, n_train=4, n_val=2):
    """root/train and root/val image folders of 2 classes."""
    make_image_folder(root / "train", n_per_class=n_train)
    make_image_folder(root / "val", n_per_class=n_val)
    return str(root)


def cli(*flags):
    return ["--global-size", "32", "--workers", "0", "--batch-size", "4", *flags]


# ----------------------------------------------------------------------------------------------
# Classifier training and the frozen backbone
# ----------------------------------------------------------------------------------------------

def test_fit_linear_separates_separable_features():
    g = torch.Generator().manual_seed(1234)  # not fit_linear's seed 0: the init must not align with the centres
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(400) % 4
    features = centres[labels] + 0.3 * torch.randn(400, 16, generator=g)
    top = lambda linear: le.accuracy(linear, features[300:], labels[300:])
    with torch.no_grad():
        untrained = top(le.fit_linear(features[:300], labels[:300], 4, epochs=1, lr=0.0, batch_size=150))
        top1, top5 = top(le.fit_linear(features[:300], labels[:300], 4, epochs=10, lr=5e-2, batch_size=150))
    assert untrained[0] <= 50.0  # so the test would fail if training did nothing
    assert top1 >= 99.0 and top5 == 100.0


def test_probe_optimizer_follows_the_paper():
    linear = le.new_linear(512, 10)
    assert abs(linear.weight.std().item() - 0.01) < 1e-3 and linear.bias.abs().sum() == 0
    lars = le.probe_optimizer(linear, is_vit=False, lr=0.8)
    assert isinstance(lars, le.LARS)
    (weights,), (bias,) = [g["params"] for g in lars.param_groups]
    assert weights is linear.weight and bias is linear.bias
    assert [g["lars_exclude"] for g in lars.param_groups] == [False, True]
    assert all(g["weight_decay"] == 0 and g["momentum"] == 0.9 for g in lars.param_groups)
    sgd = le.probe_optimizer(linear, is_vit=True, lr=0.04)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["weight_decay"] == 0


def test_linear_probe_leaves_backbone_bit_identical():
    torch.manual_seed(0)
    backbone = backbones.build_backbone("resnet18")
    backbone.train()  # the probe itself must switch it to eval (BN running stats)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    loader = le.train_loader_for(TensorDataset(uint8_images(8), torch.arange(8) % 3), 4, 0, CPU, 0, 1, seed=0)
    val_features, val_labels = torch.randn(6, 512), torch.arange(6) % 3
    torch.manual_seed(1)
    initial = le.new_linear(512, 3).weight.detach().clone()
    torch.manual_seed(1)  # the probe's Linear gets the same init
    reports = []
    linear, history = le.train_linear_probe(backbone, loader, val_features, val_labels, 3, 1, 0.5, CPU, 1, AMP_OFF,
                                            torch.amp.GradScaler("cpu", enabled=False), torch.contiguous_format,
                                            4, lambda h: reports.append(list(h)))
    after = backbone.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"backbone tensors changed: {changed[:5]}"
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not torch.equal(linear.weight.detach(), initial), "the classifier did not train"
    assert [h["epoch"] for h in history] == [1] and math.isfinite(history[0]["loss"])  # epochs count from 1
    assert history[0]["top1"] == le.accuracy(linear, val_features, val_labels)[0]
    assert reports == [history]  # report() after every epoch


def test_features_in_eval_mode_restore_the_mode():
    torch.manual_seed(0)
    backbone = backbones.build_backbone("resnet18").train()
    images = uint8_images(6)
    features, labels = le.features_in_eval_mode(backbone, backbone, TensorDataset(images, torch.arange(6)), 4, 0, CPU,
                                                0, 1, AMP_OFF, torch.contiguous_format)
    assert backbone.training
    with torch.no_grad():
        expected = backbone.eval()(views.normalize(images, CPU))
    assert features.shape == (6, 512) and torch.allclose(features, expected, atol=1e-5)
    assert labels.tolist() == list(range(6))


def test_extract_features_with_an_empty_shard(monkeypatch):
    # 1 image, 2 processes: rank 1's shard is only the sampler's padding. Each rank's all_gather_cat is simulated with what the
    # other rank sends: rank 0 runs first and records its tensors, rank 1 receives them.
    torch.manual_seed(0)
    backbone = TinyBackbone().eval()
    dataset = TensorDataset(uint8_images(1), torch.tensor([3]))
    sent = []
    monkeypatch.setattr(le, "all_gather_cat", lambda t: (sent.append(t), torch.cat([t, torch.zeros_like(t)]))[1])
    on_rank0 = le.extract_features(backbone, dataset, 4, 0, CPU, 0, 2, AMP_OFF)
    monkeypatch.setattr(le, "all_gather_cat", lambda t: torch.cat([sent.pop(0), t]))
    on_rank1 = le.extract_features(backbone, dataset, 4, 0, CPU, 1, 2, AMP_OFF)
    with torch.no_grad():
        expected = backbone(views.normalize(dataset.tensors[0], CPU))
    for features, labels in (on_rank0, on_rank1):
        assert torch.allclose(features, expected) and labels.tolist() == [3]


def test_torchrun_two_processes_one_val_image(tmp_path):
    # Real gloo processes: the DDP probe ends identical on both ranks, and the val set of 1 image leaves
    # rank 1 with an empty shard.
    data = eval_folder(tmp_path / "data", n_train=2, n_val=1)
    os.remove(os.path.join(data, "val", "b", "000.png"))
    ranks, _ = run_torchrun("linear_eval", tmp_path / "state",
                            cli("--checkpoint", "none", "--data", data, "--epochs", "1", "--batch-size", "2",
                                "--output", str(tmp_path / "result.json")))
    assert_ranks_identical(ranks, ("classifier",))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["val_images"] == 1 and result["history"][0]["epoch"] == 1


# ----------------------------------------------------------------------------------------------
# kNN against a hand computation
# ----------------------------------------------------------------------------------------------

def test_knn_weights_by_temperature():
    # bank: A=[1,0] class 0, B=[.6,.8] class 1, C=[.6,-.8] class 1, D=[-1,0] class 2 (unit length)
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    bank_labels = torch.tensor([0, 1, 1, 2])
    query, label = torch.tensor([[2.0, 0.0]]), torch.tensor([1])  # normalised to [1, 0]: sims 1, .6, .6, -1
    # k=3 (A, B, C). T=0.1: class 0 exp(10) = 22026 > class 1 2 exp(6) = 807 -> predicts 0 (majority loses)
    assert le.knn_classify(bank, bank_labels, query, label, 3, k=3, temperature=0.1) == (0.0, 100.0)
    # T=1: class 0 exp(1) = 2.72 < class 1 2 exp(.6) = 3.64 -> predicts 1. Top-5 is top-3 with 3 classes
    assert le.knn_classify(bank, bank_labels, query, label, 3, k=3, temperature=1.0) == (100.0, 100.0)
    # k=1: only A votes
    assert le.knn_classify(bank, bank_labels, query, label, 3, k=1, temperature=1.0)[0] == 0.0
    # k larger than the bank: all 4 vote, class 1 3.64 > class 0 2.72 > class 2 exp(-1) = .37
    assert le.knn_classify(bank, bank_labels, query, label, 3, k=100, temperature=1.0) == (100.0, 100.0)


def test_knn_top5_by_hand():
    # bank at angles 0, 20, ..., 100 and 180 degrees, classes 0..6. A query at 0 degrees with k=5
    # gets classes 0..4 with weights exp(cos(angle)/T): 0 > 1 > 2 > 3 > 4, classes 5 and 6 none.
    angles = torch.tensor([0.0, 20, 40, 60, 80, 100, 180]) * math.pi / 180
    bank = torch.stack([angles.cos(), angles.sin()], dim=1)
    queries = torch.tensor([[1.0, 0.0]] * 3)
    labels = torch.tensor([0, 4, 5])  # top-1 and top-5 hit / top-5 only / neither
    expected = (100.0 / 3, 200.0 / 3)
    for chunk in (1, 512):
        top1, top5 = le.knn_classify(bank, torch.arange(7), queries, labels, 7, k=5, temperature=0.07, chunk=chunk)
        assert top1 == pytest.approx(expected[0]) and top5 == pytest.approx(expected[1])
    # k=6: class 5 (100 degrees) votes too but has the 6th largest score, so top-5 stays 0..4
    assert le.knn_classify(bank, torch.arange(7), queries, labels, 7, k=6) == pytest.approx(expected)
    # a second class-5 image at 10 degrees: k=6 votes 0 > 5 > 1 > 2 > 3 > 4, so class 4 drops out of
    # the top-5 and class 5 enters it (one query at a time)
    bank5 = torch.cat([bank, torch.tensor([[math.cos(math.pi / 18), math.sin(math.pi / 18)]])])
    labels5 = torch.tensor([0, 1, 2, 3, 4, 5, 6, 5])
    one = lambda label: le.knn_classify(bank5, labels5, queries[:1], torch.tensor([label]), 7, k=6)
    assert (one(0), one(4), one(5), one(3)) == ((100.0, 100.0), (0.0, 0.0), (0.0, 100.0), (0.0, 100.0))


def test_knn_on_an_image_folder(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                shade = tuple(min(255, c + 10 * i) for c in colour)
                Image.new("RGB", (40, 40), shade).save(tmp_path / split / name / f"{i}.png")
    mean_colour = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).train()
    bank_set, val_set = views.build_eval_datasets(str(tmp_path), views.eval_transform(32))
    result = dino.knn_monitor(mean_colour, bank_set, val_set, 4, 0, CPU, 0, 1, AMP_OFF)
    assert result == {"knn_top1": 100.0, "knn_top5": 100.0}  # 2 classes: top-5 is top-2
    assert mean_colour.training
    # the same bank with swapped val labels: every prediction is wrong
    bank, bank_labels = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3), torch.tensor([0] * 3 + [1] * 3)
    assert le.knn_classify(bank, bank_labels, bank, 1 - bank_labels, 2, k=3)[0] == 0.0


# ----------------------------------------------------------------------------------------------
# Checkpoint loading (the pre-training scripts' format: method, config with the arch, the networks)
# ----------------------------------------------------------------------------------------------

def _states(arch, seeds):
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(backbones.build_backbone(arch).state_dict())
    return out


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def _saved(method, arch, **networks):
    return dict(method=method, config=dict(arch=arch, epochs=1), epoch=1, history=[], **networks)


def _load(path, arch="resnet18", key="teacher"):
    state, info = le.read_checkpoint(str(path), key)
    return le.backbone_from(state, info, arch), info


def _assert_loaded(backbone, state):
    loaded = backbone.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def r18():
    return _states("resnet18", [0, 1])


def test_load_all_checkpoint_formats(tmp_path, r18):
    student, teacher = r18
    head = {"head.mlp.0.weight": torch.randn(2048, 512), "head.last_layer.weight_g": torch.ones(4096, 1)}
    formats = {
        "dino": _saved("dino", "resnet18", student={**_prefixed(student, "backbone."), **head},
                       teacher={**_prefixed(teacher, "backbone."), **head}),
        "moco": _saved("moco", "resnet18", key_encoder={}, query_encoder={  # also one saved from a DDP wrapper
            **_prefixed(student, "module.backbone."), "module.head.0.weight": torch.randn(3, 3)}),
        "swav": _saved("swav", "resnet18", model={**_prefixed(student, "backbone."),
                                                  "projection.0.weight": torch.randn(3, 3),
                                                  "prototypes.weight": torch.randn(3, 3)}),
        "exported": student,
    }
    for name, checkpoint in formats.items():
        torch.save(checkpoint, tmp_path / f"{name}.pth")
    backbone, info = _load(tmp_path / "dino.pth")
    _assert_loaded(backbone, teacher)  # teacher by default, as official DINO
    assert (info["method"], info["arch"], info["key"]) == ("dino", "resnet18", "teacher")
    assert "mlp.0.weight" in info["head"]
    backbone, _ = _load(tmp_path / "dino.pth", key="student")
    _assert_loaded(backbone, student)
    for name in ("moco", "swav", "exported"):
        backbone, info = _load(tmp_path / f"{name}.pth")
        _assert_loaded(backbone, student)
        assert info["method"] == name and info["head"] is None
    # the arch defaults to the one in the checkpoint's config; --arch wins; resnet18 without either
    resolve = lambda flags, arch: le.resolve_config(le.get_args_parser().parse_args(flags), arch).arch
    assert resolve(["--checkpoint", "x"], "resnet34") == "resnet34"
    assert resolve(["--checkpoint", "x", "--arch", "mobilenet_v2"], "resnet34") == "mobilenet_v2"
    assert resolve(["--checkpoint", "none"], None) == "resnet18"


def test_load_errors_name_what_does_not_fit(tmp_path, r18):
    (r34,) = _states("resnet34", [0])
    torch.save(_saved("moco", "resnet34", query_encoder=_prefixed(r34, "backbone.")), tmp_path / "moco34.pth")
    with pytest.raises(UserError, match=r"pass --arch resnet34") as error:
        _load(tmp_path / "moco34.pth")
    assert "unexpected layer1.2" in str(error.value)
    torch.save(r34, tmp_path / "r34.pth")  # exported: no config, so every arch is tried
    with pytest.raises(UserError, match=r"holds a resnet34 backbone: pass --arch resnet34"):
        _load(tmp_path / "r34.pth")
    shrunk = dict(r18[0], **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    torch.save(shrunk, tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"wrong shape conv1.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)"):
        _load(tmp_path / "shape.pth")
    torch.save(_saved("dino", "resnet18", student=_prefixed(r18[0], "backbone.")), tmp_path / "no_teacher.pth")
    with pytest.raises(UserError, match=r"without 'teacher'"):
        _load(tmp_path / "no_teacher.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read"):
        _load(tmp_path / "garbage.pth")
    with pytest.raises(UserError, match=r"no such file"):
        _load(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------
# Label subsets and fine-tuning
# ----------------------------------------------------------------------------------------------

def test_balanced_subset_is_deterministic_and_balanced():
    order = torch.randperm(153, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 3)[order]
    subset = le.balanced_subset(labels, 0.1, seed=0)
    assert subset == le.balanced_subset(labels, 0.1, seed=0)
    assert subset != le.balanced_subset(labels, 0.1, seed=1)
    assert subset == sorted(set(subset))
    assert torch.bincount(labels[subset]).tolist() == [10, 5, 1]  # 10% of each class, at least 1
    assert le.balanced_subset(labels, 1.0) == list(range(153))


def test_subset_file_matches_file_names(tmp_path):
    subset = tmp_path / "semi_1percent.txt"
    subset.write_text("0,0,n01440764,n01440764_10026.JPEG\nb.png\n\n")
    paths = ["/d/n01440764/n01440764_10026.JPEG", "/d/c/a.png", "/d/c/b.png", "/d/n01440764/other.JPEG"]
    assert le.subset_from_file(paths, str(subset)) == ([0, 2], 2)


def test_finetune_head_from_dino_and_loss_decreases():
    torch.manual_seed(0)
    model = le.finetune_net(backbones.build_backbone("resnet18"), num_classes=4, hidden=128)  # paper 2048
    nn = torch.nn  # DINO's CNN head.mlp (hidden 128 here): Linear-BN-GELU-Linear-BN-GELU-Linear(256)
    dino_mlp = nn.Sequential(nn.Linear(512, 128), nn.BatchNorm1d(128), nn.GELU(), nn.Linear(128, 128),
                             nn.BatchNorm1d(128), nn.GELU(), nn.Linear(128, 256))
    dino_mlp[4].running_var.uniform_(0.5, 2.0)
    dino_head = {f"mlp.{k}": v for k, v in dino_mlp.state_dict().items()}
    assert "copied" in le.init_head_from_dino(model, dino_head)
    assert torch.equal(model.head[3].weight, dino_head["mlp.3.weight"])
    assert torch.equal(model.head[4].running_var, dino_head["mlp.4.running_var"])
    vit_head = {"mlp.0.weight": torch.randn(128, 512), "mlp.2.weight": torch.randn(128, 128)}  # no BN
    assert "random" in le.init_head_from_dino(model, vit_head)
    assert "random" in le.init_head_from_dino(model, None)

    optimizer = le.finetune_optimizer(model, lr=0.01)
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    # 4 epochs of 1 batch through the loop of the probe and fine-tuning
    loader = le.train_loader_for(TensorDataset(uint8_images(8), torch.arange(8) % 4), 8, 0, CPU, 0, 1, seed=0)
    history = le.train_and_evaluate(model, optimizer, loader, 4, 0.01, lambda images: views.normalize(images, CPU),
                                    dict, CPU, 1, AMP_OFF, torch.amp.GradScaler("cpu", enabled=False), lambda h: None)
    losses = [h["loss"] for h in history]
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------------------------
# The command line: channels_last, where the results go, user errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["knn", "linear", "finetune"])
def test_cnn_weights_are_channels_last_on_cuda(tmp_path, monkeypatch, mode):
    # The CUDA branch of backbones.memory_format, forced on this CPU: the backbone (and the crops) follow it.
    cuda_format = backbones.memory_format
    monkeypatch.setattr(backbones, "memory_format", lambda arch, device: cuda_format(arch, "cuda"))
    data = eval_folder(tmp_path / "data", n_train=2, n_val=1)
    out = le.main(cli("--mode", mode, "--checkpoint", "none", "--data", data, "--epochs", "1",
                      "--label-fraction", "0.5", "--output", str(tmp_path / "result.json")))
    assert out["backbone"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not out["backbone"].conv1.weight.is_contiguous()
    if mode != "knn":  # epochs count from 1 in the results
        assert [h["epoch"] for h in json.loads((tmp_path / "result.json").read_text())["history"]] == [1]


def test_results_go_beside_each_checkpoint(tmp_path, monkeypatch, r18):
    output = le.default_output
    assert output("runs/dino-resnet18/checkpoint.pth", "resnet18", "knn") == "runs/dino-resnet18/eval-knn.json"
    assert output("exported/r18.pth", "resnet18", "linear") == "exported/r18.eval-linear.json"
    assert output("none", "resnet34", "linear") == "runs/eval-random-resnet34/eval-linear.json"
    assert output("a/checkpoint.pth", "resnet18", "knn", "student") == "a/eval-knn-student.json"
    assert output("a/checkpoint.pth", "resnet18", "finetune", label_fraction=0.1) == "a/eval-finetune-10pct.json"
    monkeypatch.chdir(tmp_path)
    data = eval_folder(tmp_path / "data", n_train=2, n_val=1)
    os.makedirs("run1"), os.makedirs("run2")
    torch.save(_saved("dino", "resnet18", teacher=_prefixed(r18[0], "backbone.")), "run1/checkpoint.pth")
    torch.save(_saved("dino", "resnet18", teacher=_prefixed(r18[1], "backbone.")), "run2/checkpoint.pth")
    for checkpoint in ("run1/checkpoint.pth", "run2/checkpoint.pth", "none"):
        le.main(cli("--mode", "knn", "--checkpoint", checkpoint, "--data", data))
    for path, checkpoint in (("run1/eval-knn.json", "run1/checkpoint.pth"),
                             ("run2/eval-knn.json", "run2/checkpoint.pth"),
                             ("runs/eval-random-resnet18/eval-knn.json", "none")):
        assert json.loads((tmp_path / path).read_text())["checkpoint"] == checkpoint


def test_user_errors(tmp_path):
    data = eval_folder(tmp_path / "data", n_train=1, n_val=1)
    for flags, message in ((["--epochs", "0"], "--epochs must be an integer >= 1, not 0"),
                           (["--lr", "0"], "--lr must be a finite number > 0, not 0.0"),
                           (["--arch", "vit_tiny", "--global-size", "40"], "multiple of 16"),
                           (["--data", str(tmp_path)], "no train/ folder")):
        with pytest.raises(UserError, match=message):
            le.main(cli("--checkpoint", "none", "--data", data, *flags))
    # from the shell: one line on stderr, exit code 2, no traceback
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "linear_eval.py"), "--checkpoint",
                              str(tmp_path / "missing.pth")], cwd=tmp_path, env=subprocess_env(),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [f"error: --checkpoint {tmp_path / 'missing.pth'}: no such file "
                                                   "(or none for a random-init backbone)"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return eval_folder(tmp_path_factory.mktemp("data"), n_train=2, n_val=1)


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, not nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, not inf"),
    (["--mode", "knn", "--knn-t", "nan"], "--knn-t must be a finite number > 0, not nan"),
    (["--seed", "-1"], "--seed must be an integer >= 0 and <= 9223372036854775807, not -1"),
    (["--seed", str(2 ** 64)], f"--seed must be an integer >= 0 and <= 9223372036854775807, not {2 ** 64}"),
    (["--workers", "-1"], "--workers must be an integer >= 0, not -1"),
    (["--arch", "vit_tiny", "--n-last-blocks", "13"], "--n-last-blocks must be an integer >= 1 and <= 12, not 13"),
])
def test_numeric_flags_are_checked_before_anything_runs(tmp_path, monkeypatch, tiny_folder, flags, message):
    # each ended in a traceback, an exit 1 or a run; now one UserError (exit 2), nothing written
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as error:
        le.main(cli("--checkpoint", "none", "--data", tiny_folder, "--epochs", "1", *flags))
    assert str(error.value) == message and os.listdir(tmp_path) == []

