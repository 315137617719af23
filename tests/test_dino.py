import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

import dino
import training
from conftest import ROOT, TinyBackbone, assert_ranks_identical, make_image_folder, run_torchrun, subprocess_env


def hand_ce(p, logp):
    """-sum_k p_k log q_k, averaged over the batch, with plain Python loops."""
    return sum(-sum(pk * lk for pk, lk in zip(p_row, l_row)) for p_row, l_row in zip(p, logp)) / len(p)


def softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("weights", ["light", "baseline"])
def test_loss_matches_hand_computation(weights):
    # 2 images, K = 3 prototypes, 2 global + 1 local views (view-major rows).
    student = [[1.0, 0.0, -1.0], [0.5, 0.2, 0.1],    # global 1
               [0.0, 1.0, 0.0], [-0.3, 0.3, 0.9],    # global 2
               [2.0, -1.0, 0.5], [0.1, 0.1, 0.4]]    # local 1
    teacher = [[0.2, 0.1, 0.0], [1.0, -1.0, 0.0],    # global 1
               [0.0, 0.0, 1.0], [0.3, 0.3, -0.6]]    # global 2
    alpha, beta = (0.4, 0.6) if weights == "light" else (1 / 2, 1 / 2)  # baseline, 1 local: 1/(1+1)
    loss_fn = dino.DINOLoss(3, local_crops=1, alpha=alpha, beta=beta, student_temp=0.1)
    loss = loss_fn(torch.tensor(student), torch.tensor(teacher), teacher_temp=0.04).item()

    s_logp = [[math.log(v) for v in softmax(r, 0.1)] for r in student]
    t_p = [softmax(r, 0.04) for r in teacher]  # centre is 0 at the first call
    S = [s_logp[0:2], s_logp[2:4], s_logp[4:6]]
    Tp = [t_p[0:2], t_p[2:4]]
    gg = (hand_ce(Tp[0], S[1]) + hand_ce(Tp[1], S[0])) / 2
    gl = (hand_ce(Tp[0], S[2]) + hand_ce(Tp[1], S[2])) / 2
    assert loss == pytest.approx(alpha * gg + beta * gl, rel=1e-5)
    if weights == "baseline":  # = DINO's plain average over the 4 (teacher, other student view) pairs
        plain = (hand_ce(Tp[0], S[1]) + hand_ce(Tp[0], S[2]) + hand_ce(Tp[1], S[0]) + hand_ce(Tp[1], S[2])) / 4
        assert loss == pytest.approx(plain, rel=1e-5)


def test_baseline_weights_give_official_dino_average():
    torch.manual_seed(0)
    n_local, B, K = 6, 4, 10
    alpha, beta = 1 / 7, 6 / 7
    student, teacher = torch.randn((2 + n_local) * B, K), torch.randn(2 * B, K)
    loss = dino.DINOLoss(K, n_local, alpha, beta)(student, teacher, 0.04)
    # The official DINOLoss loop: every (teacher view iq, student view v != iq), total / n_terms.
    s = torch.log_softmax(student / 0.1, -1).chunk(2 + n_local)
    t = torch.softmax(teacher / 0.04, -1).chunk(2)
    total, n_terms = 0, 0
    for iq, q in enumerate(t):
        for v in range(2 + n_local):
            if v != iq:
                total += (-q * s[v]).sum(-1).mean()
                n_terms += 1
    assert loss.item() == pytest.approx((total / n_terms).item(), rel=1e-5)


def test_center_update():
    loss_fn = dino.DINOLoss(3, local_crops=0, alpha=1.0, beta=0.0, center_momentum=0.9)
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    loss_fn(torch.zeros(4, 3), t1, 0.04)
    assert torch.allclose(loss_fn.center, 0.1 * torch.tensor([[2.0, 2.0, 2.0]]))
    t2 = torch.tensor([[0.0, 0.0, 10.0], [0.0, 0.0, 0.0]])
    loss_fn(torch.zeros(4, 3), t2, 0.04)
    assert torch.allclose(loss_fn.center, torch.tensor([[0.18, 0.18, 0.18 + 0.5]]))


def test_schedules_at_known_steps():
    lr = training.cosine_schedule(1.92, 0.0048, epochs=4, iters_per_epoch=10, warmup_epochs=2)
    assert len(lr) == 40
    assert lr[0] == 0.0 and lr[10] == pytest.approx(0.96) and lr[20] == pytest.approx(1.92)
    assert lr[30] == pytest.approx(0.0048 + 0.5 * (1.92 - 0.0048) * (1 + math.cos(math.pi * 10 / 20)))
    assert lr[-1] > 0.0048 and lr[-1] < 0.02  # approaches, never hits, the final value (as DINO)
    swav_lr = training.cosine_schedule(1.2, 0.0048, 2, 5, warmup_epochs=1, start_warmup=0.075)
    assert swav_lr[0] == pytest.approx(0.075) and swav_lr[5] == pytest.approx(1.2)
    momentum = training.cosine_schedule(0.996, 1.0, 2, 5)
    assert momentum[0] == pytest.approx(0.996) and all(a < b for a, b in zip(momentum, momentum[1:]))
    args = dino.get_args_parser().parse_args(["--epochs", "60", "--arch", "resnet18"])
    dino.resolve_defaults(args)
    temps = dino.teacher_temp_schedule(args)  # CNN: 0.04 -> 0.07 over 50 epochs, then 0.07
    assert len(temps) == 60 and temps[0] == pytest.approx(0.04)
    assert temps[25] == pytest.approx(0.055) and temps[50] == temps[59] == pytest.approx(0.07)


def test_paper_defaults_per_arch():
    cnn = dino.resolve_defaults(dino.get_args_parser().parse_args(["--arch", "mobilenet_v2"]))
    vit = dino.resolve_defaults(dino.get_args_parser().parse_args(["--arch", "vit_tiny"]))
    assert (cnn.out_dim, cnn.use_bn_in_head, cnn.norm_last_layer, cnn.optimizer, cnn.lr) == (4096, True, True, "lars", 0.48)
    assert (cnn.weight_decay, cnn.weight_decay_end, cnn.warmup_teacher_temp_epochs) == (1e-6, 1e-6, 50)
    assert (vit.out_dim, vit.use_bn_in_head, vit.norm_last_layer, vit.optimizer, vit.lr) == (65536, False, False, "adamw", 5e-4)
    assert (vit.weight_decay, vit.weight_decay_end, vit.warmup_teacher_temp_epochs, vit.drop_path) == (0.04, 0.4, 30, 0.1)


def test_ema_update():
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    student = [torch.tensor([3.0, 0.0]), torch.tensor([[10.0]])]
    dino.ema_update(teacher, student, momentum=0.9)
    assert torch.allclose(teacher[0], torch.tensor([1.2, 1.8])) and torch.allclose(teacher[1], torch.tensor([[1.0]]))


def test_head_last_layer_is_weight_normalised():
    head = dino.DINOHead(16, 32, use_bn=True, norm_last_layer=True)
    assert not head.last_layer.weight_g.requires_grad
    weight = head.last_layer.weight_g * torch.nn.functional.normalize(head.last_layer.weight_v, dim=1)
    assert torch.allclose(weight.norm(dim=1), torch.ones(32))
    assert [k for k in head.state_dict() if k.startswith("mlp.") and k.endswith("weight")] == \
        ["mlp.0.weight", "mlp.1.weight", "mlp.3.weight", "mlp.4.weight", "mlp.6.weight"]
    assert dino.DINOHead(16, 32, use_bn=False, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    head = lambda: dino.DINOHead(16, 64, use_bn=True, norm_last_layer=True)
    student = dino.DINONet(TinyBackbone(), head())
    teacher = dino.DINONet(TinyBackbone(), head())
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = dino.DINOLoss(64, 2, 0.4, 0.6)
    crops = [torch.randn(8, 3, 32, 32) for _ in range(2)] + [torch.randn(8, 3, 16, 16) for _ in range(2)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = loss_fn(student(crops), teacher(crops[:2]), 0.04)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dino.ema_update(list(teacher.parameters()), list(student.parameters()), 0.996)
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def small_run_flags(data, out, *extra):
    return ["--arch", "resnet18", "--data", data, "--output-dir", str(out), "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--global-size", "32", "--local-crops", "2", "--out-dim", "64", "--log-every", "1",
            *extra]


def test_main_run_freezes_last_layer_exports_and_refuses_bad_resume(image_folder, tmp_path):
    out = tmp_path / "run"
    flags = small_run_flags(image_folder, out, "--export", str(tmp_path / "r18.pth"))
    torch.manual_seed(0)
    initial = dino.build_dino_net(dino.resolve_defaults(dino.get_args_parser().parse_args(flags)), 0.0)
    dino.main(dino.get_args_parser().parse_args(flags))
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["method"] == "dino"
    student, teacher = checkpoint["student"], checkpoint["teacher"]
    # Epoch 0 is inside --freeze-last-layer 1: the last layer never moved (student = teacher = init).
    assert torch.equal(student["head.last_layer.weight_v"], initial.state_dict()["head.last_layer.weight_v"])
    assert torch.equal(teacher["head.last_layer.weight_v"], student["head.last_layer.weight_v"])
    assert not torch.equal(student["head.mlp.0.weight"], initial.state_dict()["head.mlp.0.weight"])
    assert not torch.equal(teacher["head.mlp.0.weight"], student["head.mlp.0.weight"])  # EMA lags
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss", "lr", "wd", "teacher_temp", "img_per_s"} <= set(record) and math.isfinite(record["loss"])
    assert json.loads((out / "args.json").read_text())["arch"] == "resnet18"
    # The exported teacher backbone loads into torchvision with only the classifier missing.
    missing, unexpected = torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "r18.pth"), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    with pytest.raises(SystemExit, match="refusing to resume.*epochs"):
        dino.main(dino.get_args_parser().parse_args(small_run_flags(image_folder, out, "--epochs", "3")))
    smaller = make_image_folder(tmp_path / "smaller", n_per_class=4)  # 8 images: 2 iterations, not 4
    with pytest.raises(SystemExit, match="refusing to resume.*iters_per_epoch: checkpoint 4 vs now 2"):
        dino.main(dino.get_args_parser().parse_args(small_run_flags(smaller, out)))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(dino, "build_backbone", lambda arch, **kw: TinyBackbone())
    nan_loss = lambda self, s, t, temp: (s.sum() + t.sum()) * float("nan")
    monkeypatch.setattr(dino.DINOLoss, "forward", nan_loss)
    with pytest.raises(SystemExit, match="non-finite loss at iteration 0"):
        dino.main(dino.get_args_parser().parse_args(small_run_flags(image_folder, tmp_path / "nan")))
    assert not (tmp_path / "nan" / "checkpoint.pth").exists()


def test_torchrun_two_cpu_processes_end_identical(image_folder, tmp_path):
    flags = small_run_flags(image_folder, tmp_path / "ddp", "--batch-size", "2")
    ranks, result = run_torchrun("dino", tmp_path / "state", flags)
    assert "world 2" in result.stdout
    assert_ranks_identical(ranks, ("student", "teacher", "dino_loss"))  # weights and the centre
    assert ranks[0]["dino_loss"]["center"].abs().sum() > 0


def test_kill_during_training_then_resume(tmp_path):
    data = make_image_folder(tmp_path / "images", n_per_class=16)
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "dino.py"),
           *small_run_flags(data, out, "--epochs", "2", "--save-every", "1")]
    process = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint_path = out / "checkpoint.pth"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:  # wait for a mid-epoch checkpoint
        if checkpoint_path.exists() and torch.load(checkpoint_path, weights_only=False)["step_in_epoch"] >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(checkpoint_path, weights_only=False)
    epoch, step = killed_at["epoch"], killed_at["step_in_epoch"]
    assert epoch < 2 and (epoch, step) != (0, 0)
    resumed = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint_path}: epoch {epoch}, step {step}" in resumed.stdout
    final = torch.load(checkpoint_path, weights_only=False)
    assert final["epoch"] == 2 and final["step_in_epoch"] == 0
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_loss_stays_float32_under_autocast():
    # The CE between teacher and student must not run as a bf16 matmul under AMP (DINO computes it
    # elementwise in fp32); checked with CPU autocast, which lowers matmuls the same way.
    torch.manual_seed(0)
    student, teacher = torch.randn(4 * 8, 512) * 3, torch.randn(2 * 8, 512) * 3
    reference = dino.DINOLoss(512, 2, 0.4, 0.6)(student, teacher, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = dino.DINOLoss(512, 2, 0.4, 0.6)(student, teacher, 0.04)
    assert under_amp.dtype == torch.float32 and under_amp.item() == pytest.approx(reference.item(), rel=1e-6)


def test_vit_crop_sizes_must_fit_the_patches(tmp_path):
    flags = ["--arch", "vit_tiny", "--global-size", "32", "--output-dir", str(tmp_path)]  # locals 18 px
    with pytest.raises(SystemExit, match="multiples of its 16 px patches.*local 18"):
        dino.main(dino.get_args_parser().parse_args(flags))
