"""MoCo-v2 pre-training with the paper's view sampling (SSLight, Tan, Saleh, Martinez, ICLR 2023).

    python moco_v2.py                                # CPU/GPU demo on the built-in synthetic shapes
    python moco_v2.py --arch mobilenet_v2 --data /path/imagenet/train
    torchrun --nproc_per_node=8 moco_v2.py --arch mobilenet_v2 --data /path/imagenet/train
    python moco_v2.py --recipe classic --data ...    # the original 2-view MoCo-v2 (SGD, lr 0.03)

A query encoder (backbone + MLP head) is trained to pick, out of 1 + K candidates, the key of its
own image: the key is the momentum (EMA) encoder's embedding of another view, and the K negatives
are a queue of keys from past batches. The paper's recipe (spec §1.3, §2.2) uses multi-crop
queries [g2, l1..ln] against ONE key (g1), LARS, and loss weights alpha/beta on the g2 and local
terms; `--recipe classic` is MoCo-v2 as published (official_repos §1.2). Every number below is the
paper's unless a flag overrides it. Output: <output-dir>/{args.json, log.jsonl, checkpoint.pth}.
"""
import argparse
import json

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import training
from backbones import build_backbone, multicrop_features
from views import MultiCropTransform, describe

# Flags left unset take these. multicrop: --recipe light | baseline (spec §2.2, the paper's code);
# classic: --recipe classic, MoCo-v2 as published (official_repos §1.2).
PAPER_DEFAULTS = {
    "multicrop": dict(optimizer="lars", lr=0.48, min_lr=0.0048, warmup_epochs=10, weight_decay=1e-6,
                      decay_all_params=0, lr_schedule="iter", hidden_dim=2048),
    "classic": dict(optimizer="sgd", lr=0.03, min_lr=0.0, warmup_epochs=0, weight_decay=1e-4,
                    decay_all_params=1, lr_schedule="epoch", hidden_dim=None),  # None: = feature dim
}


def get_args_parser():
    parser = argparse.ArgumentParser("MoCo-v2 pre-training (SSLight recipes)", add_help=True,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    training.add_common_args(parser, "moco", default_arch="mobilenet_v2")  # paper: MoCo on MNv2 only
    m = parser.add_argument_group("MoCo (spec §2.2; --recipe classic = 2-view MoCo-v2; None = the recipe's value)")
    m.add_argument("--dim", type=int, default=128, help="embedding size")
    m.add_argument("--hidden-dim", type=int, default=None,
                   help="head hidden width: multi-crop 2048; classic = the backbone's feature size (MoCo-v2's fc hack)")
    m.add_argument("--queue-size", type=int, default=65536,
                   help="negatives K. Keys older than a few epochs are stale: on small data sets use 4096-16384 "
                        "(the MoCo CIFAR demo uses 4096). Need not divide the global batch (the queue wraps)")
    m.add_argument("--temperature", type=float, default=0.2, help="T: MoCo-v2 0.2 (v1 0.07)")
    m.add_argument("--momentum", type=float, default=0.999,
                   help="constant key-encoder EMA momentum; 0.99 for short runs or small data sets")
    m.add_argument("--bn-splits", type=int, default=8,
                   help="single process only: key BN statistics over this many shuffled sub-batches "
                        "(clamped to divide the batch, >= 2 images each). Aim for >= 32 images per split")
    m.add_argument("--key-sync-bn", type=int, choices=[0, 1], default=1,
                   help="torchrun on CUDA: SyncBN in the key encoder too (paper 1, spec §6.3); 0 = official MoCo: "
                        "per-GPU BN on the shuffled batch, the stricter guard against BN cheating")
    o = parser.add_argument_group("optimisation (spec §2.0, §2.2)")
    o.add_argument("--optimizer", default=None, choices=["lars", "sgd", "adamw"], help="multi-crop lars, classic sgd")
    o.add_argument("--lr", type=float, default=None,
                   help="base lr per 256 images (peak = lr * global batch / 256): multi-crop 0.48 (peak 1.92 "
                        "at 1024), classic 0.03 (0.0075 for batch 64 on 2 GPUs, moco#47)")
    o.add_argument("--min-lr", type=float, default=None, help="end of the cosine (not scaled): multi-crop 0.0048, classic 0")
    o.add_argument("--warmup-epochs", type=int, default=None, help="linear warm-up from 0: multi-crop 10, classic 0")
    o.add_argument("--lr-schedule", default=None, choices=["iter", "epoch"],
                   help="cosine updated every iteration (multi-crop) or once per epoch (classic)")
    o.add_argument("--weight-decay", type=float, default=None, help="constant: multi-crop 1e-6, classic 1e-4")
    o.add_argument("--decay-all-params", type=int, choices=[0, 1], default=None,
                   help="1: one group, decay on BN and biases too (classic); 0: the paper's 3 groups (spec §2.0)")
    return parser


def resolve_defaults(args):
    for key, value in PAPER_DEFAULTS["classic" if args.recipe == "classic" else "multicrop"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------------------------
# Model: backbone + MoCo projection head, and the queue of negatives
# ----------------------------------------------------------------------------------------------

class MoCoHead(nn.Module):
    """Linear(in -> hidden) -> ReLU -> Linear(hidden -> dim), no BN, then L2-normalised (spec §2.2).
    The paper initialises it trunc-normal(0.02); MoCo-v2 keeps PyTorch's default Linear init."""

    def __init__(self, in_dim, hidden_dim, out_dim, trunc_normal_init=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        for layer in self.mlp:
            if trunc_normal_init and isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x):
        return F.normalize(self.mlp(x).float(), dim=-1)  # normalised in fp32: the logits are divided by 0.2


class MoCoNet(nn.Module):
    """Submodules `backbone` and `head`: linear_eval.py reads checkpoint["query_encoder"]["backbone.*"]."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        # Backbone once per resolution group (g2 alone, then the locals), head once (spec §2.2).
        return self.head(multicrop_features(self.backbone, crops))


def build_moco_net(args):
    backbone = build_backbone(args.arch)
    head = MoCoHead(backbone.feat_dim, args.hidden_dim or backbone.feat_dim, args.dim,
                    trunc_normal_init=args.recipe != "classic")
    return MoCoNet(backbone, head)


class MoCoQueue(nn.Module):
    """dim x K keys, random-normal then L2-normalised at init (spec §2.2), and the write pointer.
    A module of its own, OUTSIDE the DDP model: inside, DDP would re-broadcast these 32 MB from
    rank 0 every forward (official_repos §1.2). Every rank enqueues the same all-gathered keys, so
    the copies stay identical; the init uses its own seeded generator for the same reason."""

    def __init__(self, dim, size, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(dim, size, generator=g), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys):
        """Write (n, dim) keys at the pointer, wrapping around the end, so K need not be a multiple
        of the global batch. Index arithmetic on the device: no host sync per step."""
        size = self.queue.shape[1]
        if len(keys) > size:
            raise ValueError(f"{len(keys)} keys per step exceed the queue size {size}; raise --queue-size")
        index = (self.ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue.index_copy_(1, index, keys.T.to(self.queue.dtype))
        self.ptr.copy_((self.ptr + len(keys)) % size)


# ----------------------------------------------------------------------------------------------
# Loss: InfoNCE of every query against the key of g1 and the queue, SSLight-weighted
# ----------------------------------------------------------------------------------------------

def moco_logits(q, k, queue, temperature):
    """(n_queries * B, 1 + K) logits: column 0 = q.k (the positive), then q.queue, all / T.
    q is view-major (rows [v * B, (v + 1) * B) = query view v), k is (B, dim), queue (dim, K)."""
    n_queries = len(q) // len(k)
    positive = (q.view(n_queries, len(k), -1) * k).sum(-1).reshape(-1, 1)
    return torch.cat([positive, q @ queue], dim=1) / temperature


def moco_loss(logits, n_queries, alpha, beta):
    """alpha * CE(g2 vs key g1) + beta * mean_i CE(local_i vs key g1), target index 0 (spec §1.3).
    With alpha = 1/(1+n), beta = n/(1+n) (baseline) this is the plain mean over the 1 + n queries;
    with no locals it is CE(g2) alone."""
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    ce = F.cross_entropy(logits.float(), target, reduction="none").view(n_queries, -1).mean(1)
    if n_queries == 1:
        return ce[0]
    return alpha * ce[0] + beta * ce[1:].mean()


# ----------------------------------------------------------------------------------------------
# Keys without BN cheating: shuffle-BN across GPUs, split-BN in one process
# ----------------------------------------------------------------------------------------------
# A query and its positive key must not share BN statistics: the batch statistics leak which
# samples sit together and the network learns that "signature" instead of the images (MoCo §3.3;
# moco#46). Official MoCo shuffles the key batch across GPUs; it refuses to run on one GPU. In one
# process we shuffle and run the key encoder on --bn-splits sub-batches (MoCo's CIFAR demo,
# SplitBatchNorm): a key's BN statistics then come from a random subset, not from the images its
# query was normalised with. The extra small key passes cost little (the key encoder sees g1 only);
# its running statistics are never used (kNN, export and linear_eval read the query encoder).

def split_bn_keys(key_encoder, images, bn_splits):
    perm = torch.randperm(len(images), device=images.device)
    keys = torch.cat([key_encoder([chunk]) for chunk in images[perm].chunk(bn_splits)])
    return keys[torch.argsort(perm)]


def shuffle_bn_keys(key_encoder, images):
    """Gather all ranks' images, apply rank 0's permutation, run this rank's slice, gather the keys
    and undo the permutation with argsort; each rank returns the keys of its own images."""
    world, rank = dist.get_world_size(), dist.get_rank()
    all_images = training.concat_all_gather(images)
    perm = torch.randperm(len(all_images), device=images.device)
    dist.broadcast(perm, src=0)  # one permutation for everyone
    keys = training.concat_all_gather(key_encoder([all_images[perm.view(world, -1)[rank]]]))
    return keys[torch.argsort(perm)].view(world, len(images), -1)[rank]


def moco_forward(query_encoder, key_encoder, crops, bn_splits):
    """-> queries (n_queries * B, dim) of [g2, l1..ln] and keys (B, dim) of g1: g1 is the ONLY
    key and never a query (spec §1.3). bn_splits = 0: the key encoder has no BN (plain forward)."""
    with torch.no_grad():
        if not bn_splits:
            k = key_encoder(crops[:1])
        elif training.distributed() and dist.get_world_size() > 1:
            k = shuffle_bn_keys(key_encoder, crops[0])
        else:
            k = split_bn_keys(key_encoder, crops[0], bn_splits)
    return query_encoder(crops[1:]), k


def clamp_bn_splits(bn_splits, batch_size, log):
    """Largest divisor of the batch <= bn_splits that leaves >= 2 images per split (BN needs 2)."""
    splits = max(d for d in range(1, max(1, min(bn_splits, batch_size // 2)) + 1) if batch_size % d == 0)
    if splits != bn_splits:
        log(f"note: --bn-splits {bn_splits} -> {splits} ({batch_size // splits} images each)")
    return splits


@torch.no_grad()
def ema_update(key_params, query_params, momentum):
    """key = m * key + (1 - m) * query, parameters only (the key encoder's BN buffers come from
    its own train-mode forward), one foreach call."""
    torch._foreach_lerp_(key_params, query_params, 1.0 - momentum)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def main(args):
    run = training.setup_run(args)
    resolve_defaults(args)
    recipe = training.recipe_from_args(args, "moco")
    alpha, beta = recipe.alpha_beta
    n_queries = 1 + recipe.local_crops  # g2 + every local crop
    checkpoint_path = training.prepare_output_dir(args, "moco", run)
    log = print if run.main else (lambda *a, **k: None)
    if args.data in (None, "synthetic"):
        log("training on the built-in synthetic shapes demo set (pass --data DIR for real images)")
    log(f"MoCo-v2 {args.arch} ({args.recipe}) | world {run.world} on {run.device} | views: {describe(recipe)}")
    if args.queue_size < args.batch_size * run.world:
        raise SystemExit(f"--queue-size {args.queue_size} is smaller than the global batch {args.batch_size * run.world}")

    # ============ data ============
    dataset = training.build_dataset(args.data, MultiCropTransform(recipe))
    loader = training.build_train_loader(dataset, args, run)
    iters_per_epoch = args.iters_per_epoch = len(loader)  # a resume must see the same count
    log(f"{len(dataset)} images, {iters_per_epoch} iterations/epoch of {args.batch_size} x {run.world}")

    # ============ query and key encoders, queue ============
    query_encoder, key_encoder = build_moco_net(args), build_moco_net(args)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in query_encoder.modules())
    bn_splits = 0  # keys: no BN, nothing to guard
    if has_bn:  # one process: split-BN; torchrun: shuffle-BN across ranks (bn_splits unused)
        bn_splits = clamp_bn_splits(args.bn_splits, args.batch_size, log) if run.world == 1 else 1
    # The paper converts both encoders to SyncBN and still shuffles (spec §2.2, §6.3).
    query_encoder, memory_format = training.to_device(query_encoder, run, args.arch)
    key_encoder, _ = training.to_device(key_encoder, run, args.arch, sync_bn=bool(args.key_sync_bn))
    # DDP broadcasts rank 0's query encoder; the key encoder starts as a copy of it and is not
    # DDP-wrapped (it gets no gradient: it is an EMA of the query encoder).
    query_ddp = nn.parallel.DistributedDataParallel(query_encoder) if run.world > 1 else query_encoder
    key_encoder.load_state_dict(query_encoder.state_dict())
    key_encoder.requires_grad_(False)
    memory = MoCoQueue(args.dim, args.queue_size, seed=args.seed).to(run.device)

    # ============ optimizer and schedules (one value per iteration) ============
    if args.decay_all_params:  # MoCo-v2: weight decay on every parameter, BN and biases included
        groups = [dict(params=list(query_encoder.parameters()), wd_factor=1.0, lars_exclude=False)]
    else:
        groups = training.param_groups(query_encoder)
    optimizer = training.build_optimizer(args.optimizer, groups, run)
    scaler = training.grad_scaler(run, args.amp)
    warmup_epochs = training.clamp_warmup("--warmup-epochs", args.warmup_epochs, args.epochs, log)
    peak_lr = args.lr * args.batch_size * run.world / 256
    if args.lr_schedule == "iter":
        lr_schedule = training.cosine_schedule(peak_lr, args.min_lr, args.epochs, iters_per_epoch, warmup_epochs)
    else:  # MoCo-v2's lr * 0.5 * (1 + cos(pi * epoch / epochs)), held for the whole epoch
        per_epoch = training.cosine_schedule(peak_lr, args.min_lr, args.epochs, 1, warmup_epochs)
        lr_schedule = [lr for lr in per_epoch for _ in range(iters_per_epoch)]
    query_params, key_params = list(query_encoder.parameters()), list(key_encoder.parameters())

    # ============ resume ============
    start_epoch, start_step = 0, 0
    extra_keys = ("dim", "hidden_dim", "queue_size")
    checkpoint = training.load_for_resume(checkpoint_path, args, run, extra_keys=extra_keys)
    if checkpoint is not None:
        query_encoder.load_state_dict(checkpoint["query_encoder"])
        key_encoder.load_state_dict(checkpoint["key_encoder"])
        memory.load_state_dict(dict(queue=checkpoint["queue"], ptr=checkpoint["queue_ptr"]))
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty unless saved under --amp fp16 (switching --amp is allowed)
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step_in_epoch"]
        log(f"resumed from {checkpoint_path}: epoch {start_epoch}, step {start_step} of {iters_per_epoch}")
    else:
        log("arguments:\n" + training.format_args(args))

    def save(epoch, step_in_epoch):
        if run.main:
            training.save_checkpoint(dict(
                method="moco", settings=training.resume_settings(args, run, extra_keys), args=vars(args),
                query_encoder=query_encoder.state_dict(), key_encoder=key_encoder.state_dict(),
                queue=memory.queue, queue_ptr=memory.ptr, optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), epoch=epoch, step_in_epoch=step_in_epoch), checkpoint_path)

    json_log = training.JsonLog(args.output_dir, run)
    for epoch in range(start_epoch, args.epochs):
        # ============ one epoch of MoCo ============
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip_batches = start_step
        query_encoder.train(), key_encoder.train()  # the key encoder's BN uses (shuffled) batch stats
        progress = training.EpochProgress(args, run, epoch, start_step, iters_per_epoch, checkpoint_path)
        for i, (crops, _) in enumerate(loader, start=start_step):
            it = epoch * iters_per_epoch + i  # global iteration: index into the schedules
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule[it]
                group["weight_decay"] = args.weight_decay * group["wd_factor"]
            crops = [c.to(run.device, non_blocking=True, memory_format=memory_format) for c in crops]

            ema_update(key_params, query_params, args.momentum)  # before the keys, as MoCo (spec §2.2)
            with training.autocast(run, args.amp):
                q, k = moco_forward(query_ddp, key_encoder, crops, bn_splits)
            logits = moco_logits(q.float(), k.float(), memory.queue, args.temperature)  # fp32: / T = 0.2
            loss = moco_loss(logits, n_queries, alpha, beta)

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            # After backward: the matmul above saved the queue, an in-place write before would break it.
            memory.enqueue(training.concat_all_gather(k))  # every rank's keys, in rank order

            accuracy = (logits.detach().argmax(1) == 0).float().mean()  # instance discrimination top-1
            if progress.update(it, lr_schedule[it], loss=loss, acc=accuracy):
                save(epoch, i + 1)

        # ============ end of epoch: log, monitor, checkpoint ============
        record = dict(epoch=epoch + 1, **progress.close(it), lr=lr_schedule[it], wd=args.weight_decay,
                      momentum=args.momentum)
        record.update(training.knn_eval_if_due(query_encoder.backbone, args, run, epoch))
        log(json.dumps(record))
        json_log.write(**record)
        save(epoch + 1, 0)
        start_step = 0

    if args.export and run.main:
        training.export_backbone(training.strip_prefix(query_encoder.state_dict(), "backbone."), args.export, args.arch)
    training.cleanup()
    return dict(query_encoder=query_encoder, key_encoder=key_encoder, queue=memory)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
