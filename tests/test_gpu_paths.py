"""What a GPU run changes: logits kept in fp32 under autocast, --compile, the one-process-per-GPU check;
and the CUDA tests that tests/gpu_check.py runs on a GPU machine (marked cuda, skipped elsewhere)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import backbones
import dino
import linear_eval
import moco_v2
import swav
from conftest import TinyBackbone, run_torchrun
from views import UserError

SCRIPTS = {"dino": dino, "moco": moco_v2, "swav": swav}
HEADS = {"dino": ["--out-dim", "64"], "moco": ["--queue-size", "64"],
         "swav": ["--hidden-dim", "64", "--feat-dim", "16", "--num-prototypes", "32"]}


def run_flags(method, data, out, *extra):
    return ["--data", str(data), "--output-dir", str(out), "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--global-size", "32", "--local-crops", "2", "--log-every", "1",
            *HEADS[method], *extra]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(backbones, "build_backbone", lambda arch, **kw: TinyBackbone())


def total_variation(logits_a, logits_b, temperature):
    p, q = (F.softmax(x / temperature, dim=-1) for x in (logits_a, logits_b))
    return 0.5 * (p - q).abs().sum(-1).mean().item()


def test_dino_logits_are_fp32_under_autocast():
    """The last layer runs outside autocast: the same numbers as fp32, where bf16 logits would move the
    teacher's softmax at T = 0.04 (the rounding is up to 2^-8 of a cosine, / 0.04)."""
    torch.manual_seed(0)
    head = dino.DINOHead(32, 4096, use_bn=False, norm_last_layer=True, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        bottleneck = F.normalize(head.mlp(x), dim=-1).float()  # what forward hands the last layer
        rounded = head.last_layer(bottleneck).float()  # the last layer left under autocast
    exact = head.last_layer(bottleneck)
    assert logits.dtype == torch.float32 and torch.allclose(logits, exact, atol=1e-6)
    assert rounded.dtype == torch.float32 and not torch.allclose(rounded, exact, atol=1e-4)
    assert total_variation(rounded, exact, 0.04) > 1e-3 > total_variation(logits, exact, 0.04)


def test_swav_scores_are_fp32_under_autocast():
    """Prototype scores outside autocast: Sinkhorn's codes from them equal those of the fp32 scores; from
    bf16 scores (divided by epsilon 0.05) they would not."""
    torch.manual_seed(0)
    model = swav.SwAVNet(TinyBackbone(), hidden_dim=64, feat_dim=16, num_prototypes=300)
    model.normalize_prototypes()  # as before every training step: the scores are cosines
    crops = [torch.randn(32, 3, 16, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings, scores = model(crops)
        rounded = model.prototypes(embeddings).float()
    exact = embeddings @ model.prototypes.weight.t()
    assert embeddings.dtype == scores.dtype == torch.float32
    assert torch.allclose(scores, exact, atol=1e-6) and not torch.allclose(rounded, exact, atol=1e-4)
    codes = swav.sinkhorn(exact)
    relative = lambda other: ((swav.sinkhorn(other) - codes).abs() / codes).max().item()
    assert relative(scores) < 1e-4 and relative(rounded) > 1e-2


@pytest.mark.parametrize("method", SCRIPTS)
def test_compile_flag_compiles_the_forward_networks(method, image_folder, tmp_path, tiny, monkeypatch):
    """--compile hands the networks the step calls forward on to torch.compile, and nothing else;
    without it nothing is compiled. (Recorded, not compiled: compiling is the slow test below.)"""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    SCRIPTS[method].main(run_flags(method, image_folder, tmp_path / "plain"))
    assert compiled == []
    result = SCRIPTS[method].main(run_flags(method, image_folder, tmp_path / "compiled", "--compile"))
    expected = {"dino": ["student", "teacher"], "moco": ["query_encoder", "key_encoder"],
                "swav": ["model"]}[method]
    assert compiled == [result[name] for name in expected]
    assert json.loads((tmp_path / "compiled" / "args.json").read_text())["compile"] is True


@pytest.mark.slow
@pytest.mark.parametrize("method", SCRIPTS)
def test_compiled_run_equals_eager(method, image_folder, tmp_path, tiny):
    """One epoch with --compile gives the eager run's loss and weights within float tolerance."""
    runs = {mode: SCRIPTS[method].main(run_flags(method, image_folder, tmp_path / mode, *flags))
            for mode, flags in (("eager", []), ("compiled", ["--compile"]))}
    eager, compiled = (runs[mode]["history"][-1]["loss"] for mode in ("eager", "compiled"))
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    name = {"dino": "student", "moco": "query_encoder", "swav": "model"}[method]
    for key, value in runs["eager"][name].state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(runs["compiled"][name].state_dict()[key], value, atol=1e-4), key


def test_more_processes_than_gpus_is_a_one_line_error(monkeypatch):
    """torchrun --nproc_per_node=2 on a 1-GPU machine: a UserError (exit 2) that says what to do,
    raised before any process touches the GPU, instead of NCCL's traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("touched the GPU"))
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    for script in (dino, moco_v2, swav, linear_eval):
        with pytest.raises(UserError, match="2 processes on this node but 1 GPU.*--nproc_per_node=1"):
            script.init_distributed("auto", 0)


# ----------------------------------------------------------------------------------------------
# On a GPU (tests/gpu_check.py runs these)
# ----------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", SCRIPTS)
def test_amp_steps_on_cuda(method, amp, image_folder, tmp_path):
    """A real ResNet18 on CUDA under each autocast: finite losses, the fp16 GradScaler saved."""
    out = tmp_path / f"{method}-{amp}"
    result = SCRIPTS[method].main(run_flags(method, image_folder, out, "--device", "cuda",
                                            "--amp", amp))
    assert math.isfinite(result["history"][-1]["loss"])
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert checkpoint["config"]["amp"] == amp and bool(checkpoint["scaler"]) == (amp == "fp16")


@pytest.mark.cuda
def test_torchrun_one_process_per_gpu(image_folder, tmp_path):
    """DDP under NCCL with as many processes as GPUs: every rank ends with the same student."""
    gpus = torch.cuda.device_count()
    ranks, _ = run_torchrun("dino", tmp_path / "state", run_flags("dino", image_folder, tmp_path / "run",
                                                                   "--device", "cuda"),
                            nproc=gpus, cuda=True)
    for rank in ranks[1:]:
        for key, value in ranks[0]["student"].items():
            if "running_" not in key and "num_batches_tracked" not in key:
                assert torch.equal(value, rank["student"][key]), key
