"""swav.py: Sinkhorn (marginals, reference, half precision, two processes), the queue, the loss by hand, the
model, real steps, the configuration, and whole runs (freeze, queue, extension, export, refusals, the
non-finite stop, collapse, torchrun)."""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import backbones
import swav
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
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    chunk = scores.chunk(world)[rank]
    torch.save(swav.sinkhorn(chunk, epsilon=0.05, iterations=3), os.path.join(out_dir, f"codes{rank}.pt"))
    dist.destroy_process_group()


def test_sinkhorn_two_processes_equals_one_process(tmp_path):
    scores = cosine_scores(B=10, K=6, seed=2)
    # Prototypes 0-2 peak on rank 1's samples, 3-5 on rank 0's: the max shift must be all-reduced.
    scores[7, :3] += 0.5
    scores[1, 3:] += 0.5
    # Forked, not spawned: a spawned child would import this file, torch and torchvision again (~4 s).
    mp.start_processes(_sinkhorn_worker, args=(2, str(tmp_path / "init"), scores, str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
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
            assert queue.filled == 2 * (step + 1)
            assert torch.allclose(codes[0], swav.sinkhorn(scores[:B]))
            assert torch.allclose(codes[1], swav.sinkhorn(scores[B:]))
        else:  # full after 2 pushes: queue scores (the 2 earlier batches) stacked in front
            assert queue.full()
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
    # A restored queue knows how full it is from its non-zero rows.
    half = swav.EmbeddingQueue(rows=2 * B, dim=D)
    half.restore(torch.cat([queue.embeddings[:, :B], torch.zeros(2, B, D)], dim=1))
    assert half.filled == B and not half.full()
    again = swav.EmbeddingQueue(rows=2 * B, dim=D)
    again.restore(queue.embeddings)
    assert again.full()


def config_for(*flags, world_size=1):
    parser = swav.get_args_parser()
    return swav.resolve_config(parser.parse_args(list(flags)), swav.given_flags(parser, list(flags)), world_size)


def test_queue_rows_trimmed_to_the_global_batch():
    assert swav.queue_rows(3840, 128, 8) == 384  # 3840 -> 3072 over 8 processes
    assert swav.queue_rows(3840, 64, 1) == 3840 and swav.queue_rows(0, 64, 2) == 0
    with pytest.raises(swav.UserError, match="--queue-length 100 holds less than one global batch .* 128"):
        config_for("--batch-size", "64", "--queue-length", "100", world_size=2)


def test_paper_defaults_and_short_run_warmups():
    paper = config_for()
    assert (paper.arch, paper.hidden_dim, paper.feat_dim, paper.num_prototypes, paper.epsilon) == \
        ("mobilenet_v2", 4096, 128, 3000, 0.05)
    assert (paper.warmup_epochs, paper.epoch_queue_starts, paper.freeze_prototypes_epochs) == (10, 15, 1)
    assert (paper.local_crops, paper.local_size, paper.loss_weights, paper.lr) == (6, 128, (0.4, 0.6), 0.3)
    short = config_for("--epochs", "20")  # the paper's warm-ups keep their fraction of the run
    assert (short.warmup_epochs, short.epoch_queue_starts, short.freeze_prototypes_epochs) == \
        pytest.approx((1.0, 1.5, 0.1))
    given = config_for("--epochs", "20", "--epoch-queue-starts", "3", "--freeze-prototypes-epochs", "2")
    assert (given.epoch_queue_starts, given.freeze_prototypes_epochs) == (3, 2)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be >= 1"), (["--epsilon", "0"], "--epsilon"),
    (["--num-prototypes", "0"], "--num-prototypes"), (["--epoch-queue-starts", "-1"], "--epoch-queue-starts"),
    (["--arch", "vit_tiny", "--global-size", "32"], "multiples of its 16 px")])
def test_nonsense_values_are_refused_before_training(flags, message):
    with pytest.raises(swav.UserError, match=message):
        config_for(*flags)


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


def test_collapse_signals():
    torch.manual_seed(0)
    B, K = 4, 6
    spread = F.normalize(torch.randn(2 * B, 8), dim=1)
    scores = spread @ F.normalize(torch.randn(K, 8), dim=1).t()
    codes = [swav.sinkhorn(scores[:B]), swav.sinkhorn(scores[B:])]
    std, entropy, top = swav.collapse_signals(spread, scores, codes, B)
    assert std > 0.2 and entropy < 0.99 * math.log(K) and top.shape == (2 * B,)
    same = spread[:1].expand(2 * B, -1)  # every image gives the same embedding: flat codes, one top prototype
    scores = same @ F.normalize(torch.randn(K, 8), dim=1).t()
    codes = [swav.sinkhorn(scores[:B]), swav.sinkhorn(scores[B:])]
    std, entropy, top = swav.collapse_signals(same, scores, codes, B)
    assert std == 0 and entropy.item() == pytest.approx(math.log(K), rel=1e-4) and len(top.unique()) == 1


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


# ----------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------

def small_run_flags(data, out, *extra):
    return ["--arch", "resnet18", "--data", str(data), "--output-dir", str(out), "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--global-size", "32", "--local-crops", "2", "--hidden-dim", "64", "--feat-dim", "16",
            "--num-prototypes", "32", "--log-every", "1", *extra]


@pytest.fixture
def tiny(monkeypatch):
    """A 2-layer CNN instead of the real backbone, for whole runs that test logic."""
    monkeypatch.setattr(backbones, "build_backbone", lambda arch, **kw: TinyBackbone())


def test_freeze_unit_norm_queue_and_extension(image_folder, tmp_path, tiny, monkeypatch, capsys):
    out = tmp_path / "run"
    # 16 images / 4 = 4 steps per epoch; a queue of 8 rows is full after 2 steps.
    flags = small_run_flags(image_folder, out, "--epoch-queue-starts", "0", "--queue-length", "8",
                            "--freeze-prototypes-epochs", "1", "--lr", "30")
    torch.manual_seed(0)  # main seeds the same way before it builds the model
    initial = swav.build_swav_net("resnet18", 64, 16, 32).state_dict()
    seen = []  # (prototypes given to assign_codes, queue contents, queue in use) at every step
    original_assign = swav.assign_codes

    def spy(scores, embeddings, prototypes, queue, *a):
        seen.append((prototypes.detach().clone(), queue.embeddings.clone(), queue.full()))
        return original_assign(scores, embeddings, prototypes, queue, *a)

    monkeypatch.setattr(swav, "assign_codes", spy)
    swav.main(flags)
    first = torch.load(out / "checkpoint.pth", weights_only=False)
    assert (first["method"], first["epoch"]) == ("swav", 1)
    assert [full for _, _, full in seen] == [False, False, True, True]
    # Frozen during epoch 1: the prototypes are the initial ones, renormalised; the rest moved.
    assert torch.allclose(first["model"]["prototypes.weight"], F.normalize(initial["prototypes.weight"], dim=1),
                          atol=1e-6)
    moved = lambda a, b: (a - b).abs().max().item() > 1e-5  # a LARS step moves a weight by ~lr * 1e-3 * |w|
    assert moved(first["model"]["projection.0.weight"], initial["projection.0.weight"])
    saved_queue = first["queue"]
    assert saved_queue.shape == (1, 2, 8, 16) and torch.allclose(saved_queue.norm(dim=-1), torch.ones(1, 2, 8))
    assert "collapse" not in capsys.readouterr().out

    # --epochs 2 extends the finished run: the saved queue comes back, full, and the prototypes now move.
    seen.clear()
    swav.main(["--output-dir", str(out), "--epochs", "2", "--workers", "0"])
    assert "extending the run from 1 to 2 epochs" in capsys.readouterr().out
    final = torch.load(out / "checkpoint.pth", weights_only=False)
    assert final["epoch"] == 2 and len(seen) == 4
    assert torch.equal(seen[0][1], saved_queue[0]) and seen[0][2]  # resumed with the saved, full queue
    for prototypes, _, _ in seen:  # unit norm at every forward
        assert torch.allclose(prototypes.norm(dim=1), torch.ones(32), atol=1e-6)
    assert moved(seen[-1][0], seen[0][0])  # no longer frozen in epoch 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["queue_full"] for r in records)
    assert {"loss", "lr", "wd", "img_per_s", "embedding_std", "code_entropy", "prototypes_used"} <= set(records[0])


def test_real_backbone_export_and_incompatible_resume_refused(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    # --batch-size 8: 2 steps; the warm-up spans the whole run; the queue would start after it.
    swav.main(small_run_flags(image_folder, out, "--batch-size", "8", "--warmup-epochs", "1",
                              "--epoch-queue-starts", "1", "--export", str(tmp_path / "r18.pth")))
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert set(checkpoint) >= {"method", "config", "model", "optimizer", "scaler", "queue", "epoch", "history"}
    assert checkpoint["queue"] is None
    record = json.loads((out / "log.jsonl").read_text())
    assert math.isfinite(record["loss"]) and record["queue_full"] is False
    # Peak lr 0.3 * 8 / 256 is below --start-warmup 0.075: the warm-up starts at the peak instead (logged).
    assert record["lr"] == pytest.approx(0.3 * 8 / 256)
    assert "note: --start-warmup 0.075 is above the peak lr" in capsys.readouterr().out
    missing, unexpected = torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "r18.pth"), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    # A finished run says so and exports from its checkpoint with only --output-dir.
    swav.main(["--output-dir", str(out), "--export", str(tmp_path / "again.pth")])
    assert "this run is finished: 1 epochs" in capsys.readouterr().out
    assert torch.load(tmp_path / "again.pth").keys() == torch.load(tmp_path / "r18.pth").keys()
    with pytest.raises(swav.UserError, match="--num-prototypes 32 -> 64$"):
        swav.main(small_run_flags(image_folder, out, "--batch-size", "8", "--warmup-epochs", "1",
                                  "--epoch-queue-starts", "1", "--epochs", "2", "--num-prototypes", "64"))


def test_non_finite_loss_stops_and_keeps_no_checkpoint(image_folder, tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(swav, "swapped_prediction_loss", lambda scores, *a: scores.sum() * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss in epoch 1, step 1"):
        swav.main(small_run_flags(image_folder, tmp_path / "nan"))
    assert not (tmp_path / "nan" / "checkpoint.pth").exists()


class ConstantBackbone(nn.Module):
    """The same feature for every image: the projection's BN maps it to one embedding, SwAV's collapse."""

    def __init__(self, **unused):
        super().__init__()
        self.feat_dim, self.is_vit = 16, False
        self.feature = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return self.feature.expand(len(x), -1)


def test_collapse_is_flagged(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backbones, "build_backbone", lambda arch, **kw: ConstantBackbone())
    result = swav.main(small_run_flags(image_folder, tmp_path / "same"))
    record = result["history"][-1]
    assert record["embedding_std"] < 1e-6 and record["code_entropy"] == pytest.approx(math.log(32), rel=1e-3)
    assert "collapse: flat codes" in capsys.readouterr().out


# Per-epoch (loss, embedding std, code entropy, prototypes used, epoch) of the README's SwAV demo
# (K 30, D 128, ln K 3.401), seeds 0-2 with --temperature 0.2 --epsilon 0.025 (healthy: +14.6 to
# +16.8 kNN points), and seed 0 with the paper's 0.1 / 0.05 (the head collapses from epoch 2).
HEALTHY = [(3.408, 0.0345, 2.325, 30, 1), (3.302, 0.0271, 2.448, 29, 2), (3.09, 0.0426, 2.113, 30, 3),
           (2.702, 0.0606, 1.741, 26, 6), (3.414, 0.0317, 2.468, 30, 1), (3.352, 0.0231, 2.598, 29, 2),
           (3.179, 0.0326, 2.303, 29, 3), (2.704, 0.055, 1.746, 25, 6), (3.42, 0.0314, 2.491, 30, 1),
           (3.353, 0.0216, 2.646, 30, 2), (3.169, 0.0355, 2.152, 29, 3), (2.631, 0.0594, 1.725, 26, 6)]
FLAT = [(3.414, 0.0073, 3.393, 27, 2), (3.403, 0.0071, 3.396, 30, 3), (3.402, 0.0071, 3.398, 30, 6),
        (3.383, 0.015, 3.302, 30, 6)]  # the last: T 0.2 at epsilon 0.05, seed 1: the loss at ln K


def test_collapse_form_sees_both_forms_and_spares_healthy_runs():
    for loss, std, entropy, used, epoch in HEALTHY:
        assert swav.collapse_form(loss, std, entropy, used, 30, 128, epoch) is None
    for loss, std, entropy, used, epoch in FLAT:
        assert swav.collapse_form(loss, std, entropy, used, 30, 128, epoch).startswith("flat")
    # A queue's form (the official loop): 5 of 100 prototypes take the images, std 17 % of healthy.
    form = swav.collapse_form(3.9, 0.17 / 128 ** 0.5, 2.0, 5, 100, 128, 6)
    assert form.startswith("concentrated")
    assert swav.collapse_form(3.9, 0.5 / 128 ** 0.5, 2.0, 5, 100, 128, 6) is None  # few, but spread


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_branches_run_on_the_cpu(image_folder, tmp_path, tiny, amp):
    """The autocast and GradScaler branches a GPU runs, forced on the CPU, with the prototypes frozen."""
    result = swav.main(small_run_flags(image_folder, tmp_path / amp, "--amp", amp, "--freeze-prototypes-epochs", "0.5"))
    assert math.isfinite(result["history"][-1]["loss"])
    scaler = torch.load(tmp_path / amp / "checkpoint.pth", weights_only=False)["scaler"]
    assert bool(scaler) == (amp == "fp16")  # the GradScaler ran under fp16 only


def test_torchrun_two_cpu_processes_end_identical(image_folder, tmp_path):
    # 16 images: 4 steps of 2 per process; a queue of 8 = 4 rows per process, in use from step 3; the
    # prototypes frozen for 2 steps, then trained (their gradient is None, then DDP's again).
    flags = small_run_flags(image_folder, tmp_path / "ddp", "--batch-size", "2", "--epoch-queue-starts", "0",
                            "--queue-length", "8", "--freeze-prototypes-epochs", "0.5")
    ranks, result = run_torchrun("swav", tmp_path / "state", flags)
    assert "2 process(es)" in result.stdout
    assert_ranks_identical(ranks, ("model",))
    # Each process keeps its own queue, and the checkpoint holds both.
    queues = [r["queue"]["embeddings"] for r in ranks]
    assert queues[0].shape == (2, 4, 16) and not torch.equal(queues[0], queues[1])
    saved = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=False)["queue"]
    assert torch.equal(saved[0], queues[0]) and torch.equal(saved[1], queues[1])
    assert ranks[0]["history"][-1]["queue_full"]


# The README's SwAV demo command (Seeing it learn on a CPU), on the built-in synthetic set.
DEMO = ["--arch", "resnet18", "--global-size", "32", "--batch-size", "32", "--local-crops", "2", "--workers", "2",
        "--eval-data", "synthetic", "--optimizer", "sgd", "--lr", "0.6", "--min-lr", "1e-3", "--warmup-epochs", "0",
        "--num-prototypes", "30", "--queue-length", "0", "--hidden-dim", "2048", "--temperature", "0.2",
        "--epsilon", "0.025"]


def test_the_demo_setting_learns_without_collapse(tmp_path, capsys):
    """The demo cut to 1 epoch (20 steps; measured 76.2 -> 88.0): the kNN must beat the untrained network's by
    8 points, the codes must have left the flat point (entropy well below ln K, spread kept), and no collapse
    line. With the paper's --temperature 0.1 --epsilon 0.05 the same epoch gains 8.8 points, but its codes
    are flat (entropy 0.97 of ln K): this test fails."""
    history = swav.main(DEMO + ["--epochs", "1", "--eval-every", "1000", "--log-every", "100",
                                "--output-dir", str(tmp_path / "run")])["history"]
    untrained, final = history[0]["knn_top1"], history[-1]
    assert final["knn_top1"] >= untrained + 8, (untrained, final)
    assert final["code_entropy"] < 0.9 * math.log(30) and final["embedding_std"] > 0.2 / 128 ** 0.5, final
    assert "collapse:" not in capsys.readouterr().out
