import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision

import swav
import training
from conftest import TinyBackbone, assert_ranks_identical, run_torchrun


def reference_sinkhorn(scores, epsilon, iterations):
    """SwAV's single-process Sinkhorn, float64, written out step by step."""
    Q = torch.exp(scores.double() / epsilon).t()
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(iterations):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).t()


def cosine_scores(B, K, seed=0, dim=16):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, dim, generator=g), dim=1)
    return z @ F.normalize(torch.randn(K, dim, generator=g), dim=1).t()


def test_sinkhorn_marginals_and_reference():
    scores = cosine_scores(B=12, K=5)
    codes = swav.sinkhorn(scores, epsilon=0.05, iterations=3)
    assert codes.shape == (12, 5) and codes.dtype == torch.float32
    assert torch.allclose(codes.sum(dim=1), torch.ones(12), atol=1e-5)  # each sample's code sums to 1
    assert torch.allclose(codes.double(), reference_sinkhorn(scores, 0.05, 3), atol=1e-5)
    # Run to convergence, every prototype gets B/K of the mass (3 iterations only approach it).
    converged = swav.sinkhorn(scores, epsilon=0.05, iterations=200)
    assert torch.allclose(converged.sum(dim=0), torch.full((5,), 12 / 5), atol=1e-3)
    assert torch.allclose(converged.sum(dim=1), torch.ones(12), atol=1e-5)
    # Codes are sharper than a softmax of the scores but not one-hot at epsilon 0.05.
    assert 0.2 < codes.max(dim=1).values.mean() < 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkhorn_half_precision_input(dtype):
    scores = cosine_scores(B=16, K=8, seed=1).to(dtype)
    scores[0, 0] = 1.0  # exp(1 / 0.05) = 4.9e8: beyond float16's 65504
    codes = swav.sinkhorn(scores, epsilon=0.05, iterations=3)
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    assert torch.allclose(codes.double(), reference_sinkhorn(scores.double(), 0.05, 3), atol=1e-5)
    # epsilon 0.01: exp(1 / 0.01) = 2.7e43 overflows even float32 without the max subtraction.
    small_eps = swav.sinkhorn(scores, epsilon=0.01, iterations=3)
    assert torch.allclose(small_eps.double(), reference_sinkhorn(scores.double(), 0.01, 3), atol=1e-5)


def _sinkhorn_worker(rank, world, init_file, scores, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    chunk = scores.chunk(world)[rank]
    torch.save(swav.sinkhorn(chunk, epsilon=0.05, iterations=3), os.path.join(out_dir, f"codes{rank}.pt"))
    dist.destroy_process_group()


def test_sinkhorn_two_processes_equals_one_process(tmp_path):
    scores = cosine_scores(B=10, K=6, seed=2)
    # Prototypes 0-2 peak on rank 1's samples, 3-5 on rank 0's: the max shift must be all-reduced.
    scores[7, :3] += 0.5
    scores[1, 3:] += 0.5
    mp.spawn(_sinkhorn_worker, args=(2, str(tmp_path / "init"), scores, str(tmp_path)), nprocs=2, join=True)
    split = torch.cat([torch.load(tmp_path / f"codes{r}.pt") for r in range(2)])
    whole = swav.sinkhorn(scores, epsilon=0.05, iterations=3)
    assert torch.allclose(split, whole, atol=1e-6)
    # ...and differs from running each half on its own (the all-reduces matter).
    halves = torch.cat([swav.sinkhorn(h, 0.05, 3) for h in scores.chunk(2)])
    assert not torch.allclose(halves, whole, atol=1e-3)


def test_queue_fills_shifts_and_is_used_only_once_full():
    B, D, K = 2, 4, 3
    queue = swav.EmbeddingQueue(rows=2 * B, dim=D)
    prototypes = F.normalize(torch.randn(K, D), dim=1)
    batches = [F.normalize(torch.randn(2 * B, D), dim=1) for _ in range(3)]  # [g1 rows, g2 rows]
    for step, emb in enumerate(batches):
        scores = emb @ prototypes.t()
        codes = swav.assign_codes(scores, emb, prototypes, queue, B)
        if step < 2:  # not full yet: codes from the batch alone
            assert not queue.active
            assert torch.allclose(codes[0], swav.sinkhorn(scores[:B]))
            assert torch.allclose(codes[1], swav.sinkhorn(scores[B:]))
        else:  # full after 2 pushes: queue scores (the 2 earlier batches) stacked in front
            assert queue.active
            for i in range(2):
                stacked = torch.cat([batches[1][i * B:(i + 1) * B], batches[0][i * B:(i + 1) * B],
                                     emb[i * B:(i + 1) * B]]) @ prototypes.t()
                expected = swav.sinkhorn(stacked)[-B:]
                assert torch.allclose(codes[i], expected, atol=1e-6)
                assert not torch.allclose(codes[i], swav.sinkhorn(scores[i * B:(i + 1) * B]), atol=1e-3)
        # Newest at the front, the previous batch shifted back by B rows.
        assert torch.equal(queue.embeddings[0, :B], emb[:B]) and torch.equal(queue.embeddings[1, :B], emb[B:])
        if step >= 1:
            assert torch.equal(queue.embeddings[0, B:2 * B], batches[step - 1][:B])


def test_queue_rows_trimmed_to_the_global_batch():
    args = swav.get_args_parser().parse_args(["--batch-size", "128"])
    assert swav.queue_rows(args, training.Run(0, 8, torch.device("cpu")), print) == 384  # 3840 -> 3072 / 8
    args = swav.get_args_parser().parse_args(["--batch-size", "64", "--queue-length", "100"])
    assert swav.queue_rows(args, training.Run(0, 2, torch.device("cpu")), print) == 0


def hand_ce(q, scores, t):
    """-sum_k q_k log softmax(s / t)_k, averaged over the batch, in plain Python."""
    total = 0.0
    for q_row, s_row in zip(q, scores):
        log_z = math.log(sum(math.exp(v / t) for v in s_row))
        total += -sum(qk * (sk / t - log_z) for qk, sk in zip(q_row, s_row))
    return total / len(q)


@pytest.mark.parametrize("weights", ["light", "baseline"])
def test_loss_matches_hand_computation(weights):
    # B = 2 images, K = 3 prototypes, 2 global + 2 local crops (view-major rows).
    scores = [[0.9, 0.1, -0.3], [0.2, -0.5, 0.7],    # g1
              [0.4, 0.4, -0.8], [-0.1, 0.6, 0.3],    # g2
              [0.0, 1.0, -1.0], [0.5, 0.5, 0.0],     # l1
              [-0.7, 0.2, 0.9], [0.3, -0.2, 0.1]]    # l2
    q1 = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
    q2 = [[0.5, 0.4, 0.1], [0.2, 0.2, 0.6]]
    alpha, beta = (0.4, 0.6) if weights == "light" else (1 / 3, 2 / 3)  # baseline, 2 locals: 1/(1+2)
    loss = swav.swapped_prediction_loss(torch.tensor(scores), [torch.tensor(q1), torch.tensor(q2)],
                                        local_crops=2, alpha=alpha, beta=beta, temperature=0.1).item()
    S = [scores[0:2], scores[2:4], scores[4:6], scores[6:8]]
    gg = hand_ce(q1, S[1], 0.1) + hand_ce(q2, S[0], 0.1)
    gl = sum(hand_ce(q, S[v], 0.1) for q in (q1, q2) for v in (2, 3))
    assert loss == pytest.approx(alpha * gg / 2 + beta * gl / 4, rel=1e-5)
    if weights == "baseline":  # SwAV's own: sum over (code a, crop v != a) / (2 * (n_crops - 1))
        assert loss == pytest.approx((gg + gl) / 6, rel=1e-5)
    no_locals = swav.swapped_prediction_loss(torch.tensor(scores[:4]), [torch.tensor(q1), torch.tensor(q2)],
                                             local_crops=0, alpha=alpha, beta=beta, temperature=0.1).item()
    assert no_locals == pytest.approx(gg / 2, rel=1e-5)


def test_init_and_checkpoint_names():
    torch.manual_seed(0)
    net = swav.SwAVNet(TinyBackbone(), hidden_dim=32, feat_dim=8, num_prototypes=20)
    assert {k.split(".")[0] for k in net.state_dict()} == {"backbone", "projection", "prototypes"}
    assert net.prototypes.bias is None and net.prototypes.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert net.projection[0].weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert net.projection[0].bias.abs().sum() == 0 and isinstance(net.projection[1], torch.nn.BatchNorm1d)
    net.normalize_prototypes()
    assert torch.allclose(net.prototypes.weight.norm(dim=1), torch.ones(20))
    embeddings, scores = net([torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)])
    assert embeddings.shape == (12, 8) and scores.shape == (12, 20)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(12)) and scores.abs().max() <= 1 + 1e-5


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    net = swav.SwAVNet(TinyBackbone(), hidden_dim=64, feat_dim=16, num_prototypes=8)
    crops = [torch.randn(8, 3, 32, 32) for _ in range(2)] + [torch.randn(8, 3, 16, 16) for _ in range(2)]
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        net.normalize_prototypes()
        embeddings, scores = net(crops)
        codes = swav.assign_codes(scores, embeddings, net.prototypes.weight, None, 8)
        loss = swav.swapped_prediction_loss(scores, codes, 2, 0.4, 0.6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def tiny_flags(data, out, *extra):
    return ["--data", data, "--output-dir", str(out), "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--global-size", "32", "--local-crops", "2", "--hidden-dim", "64", "--feat-dim", "16",
            "--num-prototypes", "32", "--log-every", "1", *extra]


class Interrupted(Exception):
    pass


def test_freeze_unit_norm_queue_and_resume(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(swav, "build_backbone", lambda arch, **kw: TinyBackbone())
    out = tmp_path / "run"
    # 16 images / 4 = 4 steps per epoch; a queue of 8 rows is full after 2 steps.
    flags = tiny_flags(image_folder, out, "--epochs", "2", "--epoch-queue-starts", "0", "--queue-length", "8",
                       "--freeze-prototypes-epochs", "1", "--lr", "30")
    torch.manual_seed(0)
    initial = swav.build_swav_net(swav.get_args_parser().parse_args(flags)).state_dict()
    seen = []  # (prototypes given to assign_codes, queue contents, queue in use) at every step
    original_assign = swav.assign_codes

    def spy(scores, embeddings, prototypes, queue, *a):
        seen.append((prototypes.detach().clone(), queue.embeddings.clone(), queue.ready()))
        return original_assign(scores, embeddings, prototypes, queue, *a)

    original_save = training.save_checkpoint

    def save_then_die(state, path):  # a kill right after the first epoch's checkpoint
        original_save(state, path)
        raise Interrupted

    monkeypatch.setattr(swav, "assign_codes", spy)
    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        swav.main(swav.get_args_parser().parse_args(flags))
    first = torch.load(out / "checkpoint.pth", weights_only=False)
    assert (first["method"], first["epoch"], first["step_in_epoch"]) == ("swav", 1, 0)
    assert [ready for _, _, ready in seen] == [False, False, True, True]
    # Frozen during epoch 0: the prototypes are the initial ones, renormalised; the rest moved.
    assert torch.allclose(first["model"]["prototypes.weight"], F.normalize(initial["prototypes.weight"], dim=1), atol=1e-6)
    moved = lambda a, b: (a - b).abs().max().item() > 1e-5  # a LARS step moves a weight by ~lr * 1e-3 * |w|
    assert moved(first["model"]["projection.0.weight"], initial["projection.0.weight"])
    saved_queue = first["queue"]
    assert saved_queue.shape == (1, 2, 8, 16) and torch.allclose(saved_queue.norm(dim=-1), torch.ones(1, 2, 8))

    monkeypatch.setattr(training, "save_checkpoint", original_save)
    seen.clear()
    swav.main(swav.get_args_parser().parse_args(flags))
    final = torch.load(out / "checkpoint.pth", weights_only=False)
    assert final["epoch"] == 2 and len(seen) == 4
    assert torch.equal(seen[0][1], saved_queue[0]) and seen[0][2]  # resumed with the saved, full queue
    for prototypes, _, _ in seen:  # unit norm at every forward
        assert torch.allclose(prototypes.norm(dim=1), torch.ones(32), atol=1e-6)
    assert moved(seen[-1][0], seen[0][0])  # no longer frozen in epoch 1
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["queue_active"] for r in records)
    assert {"loss", "lr", "wd", "img_per_s"} <= set(records[0])


def test_real_backbone_export_and_incompatible_resume_refused(image_folder, tmp_path):
    out = tmp_path / "run"
    swav.main(swav.get_args_parser().parse_args(
        tiny_flags(image_folder, out, "--arch", "resnet18", "--export", str(tmp_path / "r18.pth"))))
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert set(checkpoint) >= {"method", "settings", "args", "model", "optimizer", "scaler", "queue", "epoch"}
    assert checkpoint["queue"] is None  # --epoch-queue-starts 15 not reached
    record = json.loads((out / "log.jsonl").read_text())
    assert math.isfinite(record["loss"]) and record["queue_active"] is False
    # Peak lr 0.3 * 4 / 256 is below --start-warmup 0.075: the warm-up starts at the peak instead.
    assert record["lr"] == pytest.approx(0.3 * 4 / 256)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "r18.pth"), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    with pytest.raises(SystemExit, match="refusing to resume.*num_prototypes"):
        swav.main(swav.get_args_parser().parse_args(
            tiny_flags(image_folder, out, "--arch", "resnet18", "--num-prototypes", "64")))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(swav, "build_backbone", lambda arch, **kw: TinyBackbone())
    monkeypatch.setattr(swav, "swapped_prediction_loss", lambda scores, *a: scores.sum() * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss at iteration 0"):
        swav.main(swav.get_args_parser().parse_args(tiny_flags(image_folder, tmp_path / "nan")))
    assert not (tmp_path / "nan" / "checkpoint.pth").exists()


def test_torchrun_two_cpu_processes_end_identical(image_folder, tmp_path):
    # 16 images: 4 steps of 2 per rank; queue 8 -> 4 rows per rank, in use from step 3.
    flags = tiny_flags(image_folder, tmp_path / "ddp", "--arch", "resnet18", "--batch-size", "2",
                       "--epoch-queue-starts", "0", "--queue-length", "8")
    ranks, result = run_torchrun("swav", tmp_path / "state", flags)
    assert "world 2" in result.stdout
    assert_ranks_identical(ranks, ("model",))
    # Each rank keeps its own queue, and the checkpoint holds both.
    queues = [r["queue"]["embeddings"] for r in ranks]
    assert queues[0].shape == (2, 4, 16) and not torch.equal(queues[0], queues[1])
    saved = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=False)["queue"]
    assert torch.equal(saved[0], queues[0]) and torch.equal(saved[1], queues[1])
