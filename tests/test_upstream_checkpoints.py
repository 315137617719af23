"""linear_eval.py on checkpoints in the upstream code's layouts (backbones.read_backbone): official DINO
(the full checkpoint and the backbone-only weights), official MoCo, SwAV's, and SSLight's own. Each file is
built here with the upstream key names from this project's tiny-initialised models (no download)."""
import argparse
import json
import sys
import types

import pytest
import torch
import torch.nn as nn
import torchvision

import backbones
import linear_eval as le
from conftest import make_image_folder
from views import UserError


def _state(arch, seed):
    torch.manual_seed(seed)
    return backbones.build_backbone(arch).state_dict()


@pytest.fixture(scope="module")
def r18():
    return _state("resnet18", 0)


@pytest.fixture(scope="module")
def vits():  # a teacher and a student (ViT builds are slow on a CPU: one)
    teacher = _state("vit_tiny", 0)
    return teacher, {k: v + 1 for k, v in teacher.items()}


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def _dino_vit_names(state):
    """Official DINO's vision_transformer.py names the MLP layers of a block mlp.fc1 / mlp.fc2."""
    return {k.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.2.", ".mlp.fc2."): v for k, v in state.items()}


def _read(path, key="teacher", arch=None):
    state, info = le.read_checkpoint(str(path), key)
    return le.backbone_from(state, info, arch or info["arch"] or "resnet18"), info


def _assert_loaded(backbone_or_state, state):
    loaded = backbone_or_state if isinstance(backbone_or_state, dict) else backbone_or_state.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_official_dino_full_checkpoint(tmp_path, vits):
    # main_dino.py's save_dict: the student is DDP-wrapped (module.), a ViT teacher is not; args holds the arch
    teacher, student = vits
    head = {"head.mlp.0.weight": torch.randn(8, 192), "head.last_layer.weight_g": torch.ones(16, 1)}
    torch.save(dict(student=_prefixed({**_prefixed(_dino_vit_names(student), "backbone."), **head}, "module."),
                    teacher={**_prefixed(_dino_vit_names(teacher), "backbone."), **head},
                    optimizer={}, epoch=100, args=argparse.Namespace(arch="vit_tiny", patch_size=16),
                    dino_loss={"center": torch.zeros(1, 16)}), tmp_path / "checkpoint.pth")
    backbone, info = _read(tmp_path / "checkpoint.pth")
    _assert_loaded(backbone, teacher)  # the teacher by default, as official DINO's eval scripts
    assert (info["method"], info["arch"], info["key"]) == ("official DINO", "vit_tiny", "teacher")
    assert set(info["head"]) == {"mlp.0.weight", "last_layer.weight_g"}
    state, info = le.read_checkpoint(str(tmp_path / "checkpoint.pth"), "student")
    _assert_loaded(state, student)


def test_official_dino_backbone_only_weights_through_the_command_line(tmp_path, vits):
    # dino_deitsmall16_pretrain.pth and the like: the teacher backbone alone, DINO's names, no arch saved
    torch.save(_dino_vit_names(vits[0]), tmp_path / "dino_vittiny16_pretrain.pth")
    data = str(tmp_path / "data")
    make_image_folder(f"{data}/train", n_per_class=2), make_image_folder(f"{data}/val", n_per_class=1)
    out = le.main(["--mode", "knn", "--checkpoint", str(tmp_path / "dino_vittiny16_pretrain.pth"), "--data", data,
                   "--global-size", "32", "--workers", "0", "--batch-size", "4"])
    _assert_loaded(out["backbone"], vits[0])
    result = json.loads((tmp_path / "dino_vittiny16_pretrain.eval-knn.json").read_text())
    assert (result["arch"], result["method"]) == ("vit_tiny", "exported")  # the one arch the weights fit


def test_official_moco_checkpoint(tmp_path, r18):
    # main_moco.py's checkpoint: the whole MoCo module (DDP) under state_dict; MoCo v2's fc is the MLP head
    mlp = {"fc.0.weight": torch.randn(4, 512), "fc.0.bias": torch.zeros(4), "fc.2.weight": torch.randn(2, 4),
           "fc.2.bias": torch.zeros(2)}
    key_encoder = {k: torch.zeros_like(v) for k, v in r18.items()}
    state_dict = {**_prefixed({**r18, **mlp}, "module.encoder_q."), **_prefixed(key_encoder, "module.encoder_k."),
                  "module.queue": torch.randn(2, 8), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save(dict(epoch=200, arch="resnet18", state_dict=state_dict, optimizer={}), tmp_path / "moco.pth.tar",
               _use_new_zipfile_serialization=False)  # the released weights predate torch 1.6's zip format
    backbone, info = _read(tmp_path / "moco.pth.tar")
    _assert_loaded(backbone, r18)
    assert (info["method"], info["arch"], info["key"], info["head"]) == ("official MoCo", "resnet18", "encoder_q",
                                                                        None)


@pytest.mark.parametrize("under_state_dict", [False, True])
def test_swav_weights(tmp_path, r18, under_state_dict):
    # swav_800ep_pretrain.pth.tar: a plain DDP state dict with the projection head and prototypes; the training
    # checkpoint holds the same under state_dict
    heads = {"projection_head.0.weight": torch.randn(4, 512), "projection_head.1.running_mean": torch.zeros(4),
             "prototypes.weight": torch.randn(3, 4)}
    state = _prefixed({**r18, **heads}, "module.")
    torch.save(dict(epoch=1, state_dict=state, optimizer={}) if under_state_dict else state, tmp_path / "swav.pth")
    backbone, info = _read(tmp_path / "swav.pth")
    _assert_loaded(backbone, r18)
    assert info["arch"] == "resnet18" and info["method"] == "exported"


def _sslight_encoder(arch, seed):
    """SSLight's BACKBONE.encoder: a ResNet's children but avgpool and fc, in an nn.Sequential; its MobileNetV2
    is laid out as torchvision's `features`. BN statistics made non-trivial, so that they are checked too."""
    torch.manual_seed(seed)
    if arch == "mobilenet_v2":
        encoder = torchvision.models.mobilenet_v2().features
    else:
        encoder = nn.Sequential(*list(getattr(torchvision.models, arch)().children())[:-2])
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 2.0)
    return encoder.eval()


def _save_with_fvcore_config(monkeypatch, checkpoint, path, arch):
    """SSLight's save_checkpoint pickles its config, an fvcore CfgNode (a dict subclass): saved here with a
    stand-in class, which cannot be imported when the file is read."""
    module = types.ModuleType("fvcore.common.config")
    module.CfgNode = type("CfgNode", (dict,), {"__module__": "fvcore.common.config"})
    config = module.CfgNode(SSL_METHOD="dino", MODEL=module.CfgNode(BACKBONE_ARCH=arch))
    config.__dict__["__immutable__"] = True
    with monkeypatch.context() as patch:
        for name in ("fvcore", "fvcore.common", "fvcore.common.config"):
            patch.setitem(sys.modules, name, module)
        torch.save(dict(checkpoint, config=config, epoch=200, steps=250200, optimizer={}), path)


@pytest.mark.parametrize("method, arch", [("dino", "resnet18"), ("moco", "mobilenet_v2"),
                                          ("swav", "mobilenet_v2")])
def test_sslight_cnn_checkpoints_give_the_same_features(tmp_path, monkeypatch, method, arch):
    network = {"dino": "teacher", "moco": "encoder_q", "swav": "network"}[method]
    encoder = _sslight_encoder(arch, 0)
    state = _prefixed(encoder.state_dict(), f"module.{network}.backbone.encoder.")
    state[f"module.{network}.head.mlp.0.weight"] = torch.randn(4, 8)
    state["module.classifier.weight"] = torch.randn(10, 8)  # the joint linear probe
    if method == "dino":  # the student: other weights
        student = _sslight_encoder(arch, 1).state_dict()
        state.update(_prefixed(student, "module.student.backbone.encoder."))
    _save_with_fvcore_config(monkeypatch, dict(state_dict=state), tmp_path / f"{method}.pth.tar", arch)
    assert "fvcore" not in sys.modules
    backbone, info = _read(tmp_path / f"{method}.pth.tar")
    assert (info["method"], info["arch"], info["key"]) == ("SSLight", arch, network)
    assert (info["head"] is not None) == (method == "dino")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = encoder(images).mean(dim=(2, 3))  # SSLight's BACKBONE: global average pooling
        assert torch.allclose(backbone.eval()(images), expected, atol=1e-5)
    if method == "dino":
        state, info = le.read_checkpoint(str(tmp_path / f"{method}.pth.tar"), "student")
        assert info["key"] == "student" and torch.equal(state["layer4.1.bn2.running_var"], student["7.1.bn2.running_var"])


def test_sslight_vit_tiny_checkpoint(tmp_path, monkeypatch, vits):
    # SSLight's ViT is official DINO's: module.student.backbone.* with DINO's names, no encoder
    teacher, student = vits
    state = {**_prefixed(_dino_vit_names(teacher), "module.teacher.backbone."),
             **_prefixed(_dino_vit_names(student), "module.student.backbone."),
             "module.student.head.mlp.0.weight": torch.randn(8, 192)}
    _save_with_fvcore_config(monkeypatch, dict(state_dict=state, loss={"center": torch.zeros(1, 8)}),
                             tmp_path / "dino_vitt16_sslight.pth.tar", "vit_tiny")
    state, info = le.read_checkpoint(str(tmp_path / "dino_vitt16_sslight.pth.tar"), "student")  # the paper's
    _assert_loaded(state, student)
    assert (info["method"], info["arch"], set(info["head"])) == ("SSLight", "vit_tiny", {"mlp.0.weight"})


def test_a_file_in_no_layout_is_named_in_one_line(tmp_path):
    torch.save({"model": {"net.conv.weight": torch.zeros(2, 3, 3, 3)}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(UserError) as error:
        _read(tmp_path / "other.pth")
    message = str(error.value)
    assert "\n" not in message and "no backbone in a known layout" in message
    for layout in ("this project's", "official DINO", "official MoCo", "SSLight", "SwAV's"):
        assert layout in message
    assert "top-level keys model, epoch; tensors model.net.conv.weight" in message
    # tensors in names of no layout: the arch's missing keys, and the layouts read
    torch.save({"encoder.weight": torch.zeros(2, 3)}, tmp_path / "tensors.pth")
    with pytest.raises(UserError, match=r"does not fit --arch resnet18: missing conv1.weight.*unexpected "
                                         r"encoder.weight.*fits no arch here \(layouts read: this project's"):
        _read(tmp_path / "tensors.pth")
