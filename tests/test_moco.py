import json
import math

import pytest
import torch
import torch.nn as nn

import moco_v2
from conftest import TinyBackbone, assert_ranks_identical, run_torchrun
from views import UserError


def hand_ce_row(logits, target=0):
    """-log softmax(logits)[target], plain Python."""
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


# 3 queries (g2, l1, l2) of B = 2 images, dim 2; key g1; K = 3 negatives. Rows are view-major.
Q = [[1.0, 0.0], [0.6, 0.8],      # g2
     [0.0, 1.0], [-0.6, 0.8],     # l1
     [0.8, -0.6], [1.0, 0.0]]     # l2
KEYS = [[0.6, 0.8], [0.0, -1.0]]
QUEUE = [[1.0, 0.0, -0.8], [0.0, 1.0, 0.6]]  # dim x K: columns are the negatives
T = 0.2


def hand_logits():
    negatives = list(zip(*QUEUE))
    return [[dot(q, KEYS[r % 2]) / T] + [dot(q, n) / T for n in negatives] for r, q in enumerate(Q)]


def test_logits_put_the_positive_first():
    logits = moco_v2.moco_logits(torch.tensor(Q), torch.tensor(KEYS), torch.tensor(QUEUE), T)
    assert logits.shape == (6, 1 + 3)
    assert torch.allclose(logits, torch.tensor(hand_logits()), atol=1e-6)
    # Each query's positive is the key of ITS image: row 3 (l1 of image 1) uses key 1, not key 0.
    assert logits[3, 0].item() == pytest.approx(dot(Q[3], KEYS[1]) / T)


@pytest.mark.parametrize("weights", ["light", "baseline"])
def test_loss_matches_hand_computation(weights):
    alpha, beta = (0.4, 0.6) if weights == "light" else (1 / 3, 2 / 3)  # baseline, 2 locals: 1/(1+2)
    logits = moco_v2.moco_logits(torch.tensor(Q), torch.tensor(KEYS), torch.tensor(QUEUE), T)
    loss = moco_v2.moco_loss(logits, n_queries=3, alpha=alpha, beta=beta).item()
    ce = [hand_ce_row(row) for row in hand_logits()]
    ce_g2, ce_l1, ce_l2 = (ce[0] + ce[1]) / 2, (ce[2] + ce[3]) / 2, (ce[4] + ce[5]) / 2
    assert loss == pytest.approx(alpha * ce_g2 + beta * (ce_l1 + ce_l2) / 2, rel=1e-5)
    if weights == "baseline":  # the plain mean over all 1 + n_local queries
        assert loss == pytest.approx(sum(ce) / 6, rel=1e-5)
    # No locals: CE of g2 alone, whatever the weights.
    g2_logits = moco_v2.moco_logits(torch.tensor(Q[:2]), torch.tensor(KEYS), torch.tensor(QUEUE), T)
    assert moco_v2.moco_loss(g2_logits, 1, alpha, beta).item() == pytest.approx(ce_g2, rel=1e-5)


def test_queue_init_enqueue_and_wrap_around():
    queue = moco_v2.MoCoQueue(dim=2, size=5, seed=3)
    assert torch.allclose(queue.keys.norm(dim=0), torch.ones(5))
    assert torch.equal(queue.keys, moco_v2.MoCoQueue(2, 5, seed=3).keys)  # same on every rank
    initial = queue.keys.clone()
    a = torch.arange(6.0).view(3, 2)
    queue.enqueue(a)
    assert queue.ptr.item() == 3 and torch.equal(queue.keys[:, :3], a.T)
    assert torch.equal(queue.keys[:, 3:], initial[:, 3:])
    b = -torch.arange(1.0, 7.0).view(3, 2)
    queue.enqueue(b)  # 5 is not a multiple of 3: columns 3, 4 then 0
    assert queue.ptr.item() == 1
    assert torch.equal(queue.keys[:, 3:], b[:2].T) and torch.equal(queue.keys[:, 0], b[2])
    assert torch.equal(queue.keys[:, 1:3], a[1:].T)


class Recorder(nn.Module):
    """Maps a list of crops to one row per image: [mean pixel, 0, ...]; records each call's shapes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, crops):
        self.calls.append([tuple(c.shape) for c in crops])
        return torch.cat([c.mean(dim=(1, 2, 3)) for c in crops])[:, None].repeat(1, 4)


def test_split_bn_shuffle_then_unshuffle_is_the_identity():
    torch.manual_seed(0)
    images = torch.arange(16.0).view(16, 1, 1, 1).expand(16, 3, 2, 2).contiguous()
    seen = []
    encoder = lambda crops: seen.append(crops[0][:, 0, 0, 0].clone()) or crops[0][:, 0, 0, 0, None] * 2
    keys = moco_v2.split_bn_keys(encoder, images, bn_splits=4)
    assert torch.equal(keys[:, 0], torch.arange(16.0) * 2)  # back in the input order
    assert [len(s) for s in seen] == [4, 4, 4, 4]  # BN statistics per sub-batch of 4
    assert not torch.equal(torch.cat(seen), torch.arange(16.0))  # ... of shuffled images
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(16.0))


@pytest.mark.parametrize("rank", [0, 1])
def test_shuffle_bn_across_ranks_returns_each_ranks_own_keys(rank, monkeypatch):
    """2 simulated ranks with 4 images each (values 0..7): the fake collectives stand in for gloo."""
    all_images = torch.arange(8.0).view(8, 1, 1, 1)
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])  # "rank 0's" permutation: each slice mixes both ranks
    encoder = lambda crops: crops[0].flatten(1) * 2
    slices = [encoder([all_images[perm[4 * j:4 * j + 4]]]) for j in range(2)]
    gathers = []

    class FakeDist:
        get_world_size, get_rank = staticmethod(lambda: 2), staticmethod(lambda: rank)

        @staticmethod
        def broadcast(tensor, src):
            assert src == 0
            tensor.copy_(perm)

    def fake_gather(tensor):
        gathers.append(tensor.clone())
        if len(gathers) == 1:
            assert torch.equal(tensor, all_images[4 * rank:4 * rank + 4])
            return all_images
        assert torch.equal(tensor, slices[rank])  # this rank ran its slice of the shuffled batch
        return torch.cat(slices)

    monkeypatch.setattr(moco_v2, "dist", FakeDist)
    monkeypatch.setattr(moco_v2, "all_gather_cat", fake_gather)
    keys = moco_v2.shuffle_bn_keys(encoder, all_images[4 * rank:4 * rank + 4])
    assert torch.equal(keys[:, 0], 2 * torch.arange(4.0 * rank, 4.0 * rank + 4)) and len(gathers) == 2


def test_clamp_bn_splits():
    assert moco_v2.clamp_bn_splits(8, 256) == 8
    assert moco_v2.clamp_bn_splits(8, 12) == 6   # divides 12
    assert moco_v2.clamp_bn_splits(8, 4) == 2    # >= 2 images per split
    assert moco_v2.clamp_bn_splits(8, 7) == 1


def test_key_bn_mode():
    # (has BN, processes, key encoder converted to SyncBN) -> how the keys are guarded against BN cheating
    assert moco_v2.key_bn_mode(False, 1, False) == moco_v2.key_bn_mode(False, 8, True) == "none"  # a ViT
    assert moco_v2.key_bn_mode(True, 1, False) == "split"  # one process
    assert moco_v2.key_bn_mode(True, 8, True) == "sync"  # CUDA torchrun, --key-sync-bn 1: no shuffle
    assert moco_v2.key_bn_mode(True, 8, False) == "shuffle"  # --key-sync-bn 0, or CPU processes (no SyncBN)


@pytest.mark.parametrize("key_bn", ["none", "sync", "split"])
def test_queries_are_g2_and_locals_and_the_key_is_g1_only(key_bn, monkeypatch):
    B = 4
    crops = [torch.full((B, 3, 8, 8), 1.0), torch.full((B, 3, 8, 8), 2.0)] + \
            [torch.full((B, 3, 4, 4), 3.0 + i) for i in range(3)]
    query, key = Recorder(), Recorder()

    def no_shuffle(*a):
        raise AssertionError("SyncBN statistics are global: the cross-rank shuffle would change nothing")

    monkeypatch.setattr(moco_v2, "shuffle_bn_keys", no_shuffle)
    q, k = moco_v2.moco_forward(query, key, crops, key_bn, bn_splits=2)
    assert q.shape == ((1 + 3) * B, 4) and k.shape == (B, 4)
    assert q[:, 0].tolist() == [2.0] * B + [3.0] * B + [4.0] * B + [5.0] * B  # [g2, l1, l2, l3]
    assert k[:, 0].tolist() == [1.0] * B  # g1, and nothing else
    assert key.calls == ([[(2, 3, 8, 8)]] * 2 if key_bn == "split" else [[(B, 3, 8, 8)]])  # 2 BN splits, or whole
    assert not k.requires_grad


def test_shuffle_is_skipped_when_the_key_encoder_has_sync_bn(monkeypatch):
    """The mode main() picks for a SyncBN key encoder on 2 processes never reaches shuffle_bn_keys."""
    key_encoder = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    has_sync_bn = any(isinstance(m, nn.SyncBatchNorm) for m in key_encoder.modules())
    mode = moco_v2.key_bn_mode(True, 2, has_sync_bn)
    calls = []
    monkeypatch.setattr(moco_v2, "shuffle_bn_keys", lambda *a: calls.append(1))
    crops = [torch.ones(2, 3, 4, 4)] * 2
    moco_v2.moco_forward(lambda c: c[0], lambda c: c[0], crops, mode, 1)  # stand-ins: SyncBN cannot run on CPU
    assert mode == "sync" and calls == []
    moco_v2.moco_forward(lambda c: c[0], lambda c: c[0], crops, moco_v2.key_bn_mode(True, 2, False), 1)
    assert calls == [1]  # per-process BN on 2 processes (CPU torchrun): shuffled


def resolve(*flags):
    parser = moco_v2.get_args_parser()
    return moco_v2.resolve_config(parser.parse_args(list(flags)), moco_v2.given_flags(parser, list(flags)), 1)


def test_paper_and_classic_defaults():
    light = resolve()
    assert (light.recipe, light.arch, light.optimizer, light.lr, light.min_lr) == ("light", "mobilenet_v2", "lars",
                                                                                  0.48, 0.0048)
    assert (light.warmup_epochs, light.weight_decay, light.lr_schedule, light.hidden_dim) == (10, 1e-6, "iter", 2048)
    assert (light.temperature, light.momentum, light.queue_size, light.dim) == (0.2, 0.999, 65536, 128)
    assert (light.decay_all_params, light.local_crops, light.loss_weights) == (0, 6, (0.4, 0.6))
    assert resolve("--epochs", "20").warmup_epochs == pytest.approx(1.0)  # 10 of 200 epochs: 5% of the run
    classic = resolve("--recipe", "classic")
    assert (classic.optimizer, classic.lr, classic.min_lr, classic.warmup_epochs) == ("sgd", 0.03, 0.0, 0)
    assert (classic.weight_decay, classic.decay_all_params, classic.lr_schedule) == (1e-4, 1, "epoch")
    assert (classic.local_crops, classic.loss_weights) == (0, (1.0, 0.0))
    head = moco_v2.build_moco_net(classic.arch, classic.dim, classic.hidden_dim, False).head
    # MoCo-v2: Linear(feat, feat) -> ReLU -> Linear(feat, 128)
    assert [tuple(m.weight.shape) for m in head.mlp if isinstance(m, nn.Linear)] == [(1280, 1280), (128, 1280)]
    with pytest.raises(UserError, match="--queue-size 100 is smaller than the global batch 128"):
        resolve("--queue-size", "100")
    with pytest.raises(UserError, match="--bn-splits must be >= 1"):
        resolve("--bn-splits", "0")


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    net = lambda: moco_v2.MoCoNet(TinyBackbone(), moco_v2.MoCoHead(16, 64, 32))
    query, key = net(), net()
    key.load_state_dict(query.state_dict())
    key.requires_grad_(False)
    crops = [torch.randn(8, 3, 32, 32) for _ in range(2)] + [torch.randn(8, 3, 16, 16) for _ in range(2)]
    with torch.no_grad():  # hard negatives: at init every embedding looks alike, the loss is near log(1 + K)
        queue = key([torch.randn(64, 3, 32, 32)]).T.contiguous()
    optimizer = torch.optim.AdamW(query.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        moco_v2.ema_update(list(key.parameters()), list(query.parameters()), 0.99)
        q, k = moco_v2.moco_forward(query, key, crops, "split", bn_splits=2)
        loss = moco_v2.moco_loss(moco_v2.moco_logits(q, k, queue, 0.2), 3, 0.4, 0.6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


def run_flags(data, out, *extra, local_crops=("--local-crops", "2")):
    return ["--arch", "resnet18", "--data", data, "--output-dir", str(out), "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--global-size", "32", *local_crops, "--queue-size", "64", "--log-every", "1", *extra]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(moco_v2.backbones, "build_backbone", lambda arch, **kw: TinyBackbone())


def test_main_run_exports_and_refuses_bad_resume(image_folder, tmp_path, tiny, capsys):
    out = tmp_path / "run"
    modules = moco_v2.main(run_flags(image_folder, out, "--export", str(tmp_path / "backbone.pth")))
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert checkpoint["method"] == "moco" and checkpoint["epoch"] == 1 and checkpoint["num_images"] == 16
    assert {"query_encoder", "key_encoder", "queue", "optimizer", "scaler", "config", "history"} <= set(checkpoint)
    queue = checkpoint["queue"]
    assert queue["keys"].shape == (128, 64) and queue["ptr"].item() == 4 * 4  # 4 steps x 4 keys
    assert torch.equal(queue["keys"], modules["queue"].keys)
    query, key = checkpoint["query_encoder"], checkpoint["key_encoder"]
    assert "backbone.net.0.weight" in query and query["head.mlp.0.weight"].shape == (2048, 16)  # linear_eval's contract
    assert not torch.equal(query["head.mlp.0.weight"], key["head.mlp.0.weight"])  # the EMA lags
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss", "contrastive_top1", "embedding_std", "lr", "wd", "img_per_s"} <= set(record)
    assert math.isfinite(record["loss"]) and 0 < record["embedding_std"] < 1
    assert record == checkpoint["history"][-1] and json.loads((out / "args.json").read_text())["queue_size"] == 64
    assert "key encoder BN: split, 2 shuffled sub-batches of 2" in capsys.readouterr().out
    # --export writes the QUERY backbone (MoCo's encoder_q) with "backbone." stripped.
    exported = torch.load(tmp_path / "backbone.pth")
    assert set(exported) == set(TinyBackbone().state_dict())
    assert torch.equal(exported["net.0.weight"], query["backbone.net.0.weight"])
    assert not torch.equal(exported["net.0.weight"], key["backbone.net.0.weight"])
    with pytest.raises(UserError, match="--queue-size 64 -> 128"):
        moco_v2.main(run_flags(image_folder, out, "--queue-size", "128"))
    # Finished: a rerun trains nothing, --export works with only --output-dir.
    moco_v2.main(["--output-dir", str(out), "--export", str(tmp_path / "again.pth")])
    assert "this run is finished: 1 epochs" in capsys.readouterr().out
    assert torch.equal(torch.load(tmp_path / "again.pth")["net.0.weight"], exported["net.0.weight"])


def test_extending_a_run_restores_the_queue(image_folder, tmp_path, tiny, monkeypatch):
    out = tmp_path / "run"
    moco_v2.main(run_flags(image_folder, out))  # 4 iterations / epoch
    saved = torch.load(out / "checkpoint.pth", weights_only=False)["queue"]
    assert saved["ptr"].item() == 4 * 4 and not torch.equal(saved["keys"], moco_v2.MoCoQueue(128, 64).keys)

    enqueue, before_first = moco_v2.MoCoQueue.enqueue, []

    def record(self, keys):
        if not before_first:
            before_first.append((self.keys.clone(), self.ptr.clone()))
        enqueue(self, keys)

    monkeypatch.setattr(moco_v2.MoCoQueue, "enqueue", record)
    modules = moco_v2.main(run_flags(image_folder, out, "--epochs", "2"))
    keys, ptr = before_first[0]
    assert torch.equal(keys, saved["keys"]) and ptr.item() == 4 * 4  # resumed exactly
    assert modules["queue"].ptr.item() == 8 * 4 % 64 and [r["epoch"] for r in modules["history"]] == [1, 2]
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 2


def test_non_finite_loss_stops_and_keeps_last_checkpoint(image_folder, tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(moco_v2, "moco_loss", lambda logits, *a: logits.sum() * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss in epoch 1, step 1"):
        moco_v2.main(run_flags(image_folder, tmp_path / "nan"))
    assert not (tmp_path / "nan" / "checkpoint.pth").exists()


def test_collapse_is_reported(image_folder, tmp_path, tiny, monkeypatch, capsys):
    """Keys that are all the same: the std signal fires with the knobs to turn."""
    forward = moco_v2.moco_forward
    same_keys = lambda *a: (lambda q, k: (q, torch.ones_like(k) / k.shape[1] ** 0.5))(*forward(*a))
    monkeypatch.setattr(moco_v2, "moco_forward", same_keys)
    moco_v2.main(run_flags(image_folder, tmp_path / "collapsed"))
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("collapse:")]
    assert len(line) == 1 and "same key" in line[0] and "--lr" in line[0] and "--queue-size" in line[0]


def test_classic_recipe_runs_two_views_with_sgd(image_folder, tmp_path, tiny, monkeypatch):
    forward, n_crops = moco_v2.moco_forward, []
    monkeypatch.setattr(moco_v2, "moco_forward", lambda q, k, crops, *a: n_crops.append(len(crops)) or
                        forward(q, k, crops, *a))
    out = tmp_path / "classic"
    moco_v2.main(run_flags(image_folder, out, "--recipe", "classic", "--epochs", "2", local_crops=()))  # recipe's 0
    assert n_crops == [2] * 8  # query = one view, key = the other; no locals
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    groups = checkpoint["optimizer"]["param_groups"]
    assert len(groups) == 1 and "nesterov" in groups[0]  # SGD, one group: decay on BN and biases too
    assert groups[0]["momentum"] == 0.9 and groups[0]["weight_decay"] == 1e-4
    assert checkpoint["query_encoder"]["head.mlp.0.weight"].shape == (16, 16)  # Linear(feat, feat)
    assert checkpoint["query_encoder"]["head.mlp.0.bias"].abs().sum() > 0  # PyTorch's default init, not zeros
    lrs = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.03 * 4 / 256, 0.03 * 4 / 256 * 0.5])  # per-epoch cosine, no warm-up


def test_torchrun_two_cpu_processes_share_keys_and_end_identical(image_folder, tmp_path):
    flags = run_flags(image_folder, tmp_path / "ddp", "--batch-size", "2")  # 16 images: 4 steps of 2 x 2
    ranks, result = run_torchrun("moco_v2", tmp_path / "state", flags)
    assert "2 process(es)" in result.stdout and "key encoder BN: shuffle" in result.stdout  # no SyncBN on CPU
    assert_ranks_identical(ranks, ("query_encoder", "key_encoder", "queue"))
    # Both ranks' keys went in: 4 steps x global batch 4 columns, the rest is still the init.
    keys, initial = ranks[0]["queue"]["keys"], moco_v2.MoCoQueue(128, 64).keys
    assert ranks[0]["queue"]["ptr"].item() == 4 * 4
    assert not torch.isclose(keys[:, :16], initial[:, :16]).all(0).any() and torch.equal(keys[:, 16:], initial[:, 16:])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_branches_run_on_the_cpu(image_folder, tmp_path, tiny, amp):
    """The autocast and GradScaler branches a GPU runs, forced on the CPU."""
    moco_v2.main(run_flags(image_folder, tmp_path / amp, "--amp", amp))
    checkpoint = torch.load(tmp_path / amp / "checkpoint.pth", weights_only=False)
    assert math.isfinite(checkpoint["history"][-1]["loss"]) and checkpoint["config"]["amp"] == amp
    assert bool(checkpoint["scaler"]) == (amp == "fp16")  # the GradScaler ran under fp16 only


# The README's MoCo demo command (Seeing it learn on a CPU), on the built-in synthetic set.
DEMO = ["--arch", "resnet18", "--global-size", "32", "--batch-size", "32", "--local-crops", "2", "--workers", "2",
        "--eval-data", "synthetic", "--optimizer", "sgd", "--lr", "0.5", "--min-lr", "1e-3", "--warmup-epochs", "0",
        "--queue-size", "1024", "--momentum", "0.99", "--bn-splits", "2"]


def test_the_demo_setting_learns_without_collapse(tmp_path, capsys):
    """The demo cut to 1 epoch (20 steps; measured 77.0 -> 84.4): the kNN must beat the untrained network's by
    5 points, the positive must beat the negatives far above chance (1 in 1025), and no collapse line."""
    history = moco_v2.main(DEMO + ["--epochs", "1", "--eval-every", "1000", "--log-every", "100",
                                   "--output-dir", str(tmp_path / "run")])["history"]
    untrained, final = history[0]["knn_top1"], history[-1]
    assert final["knn_top1"] >= untrained + 5, (untrained, final)
    assert final["contrastive_top1"] > 3 and final["loss"] < 0.98 * final["chance_loss"], final
    assert "collapse:" not in capsys.readouterr().out
