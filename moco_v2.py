"""MoCo-v2 pre-training with the paper's view sampling (SSLight, Tan, Saleh, Martinez, ICLR 2023).

    python moco_v2.py                                  # the CPU demo on the built-in synthetic set
    torchrun --nproc_per_node=8 moco_v2.py --arch mobilenet_v2 --data /path/imagenet/train

Queries [g2, l1..ln] pick their image's key (the momentum encoder's g1) out of K negatives, a queue
of past keys (SSLight's model/moco.py); defaults: the paper's (exp_yamls/moco); `--recipe classic`:
MoCo-v2 as published (main_moco.py). Output: <output-dir>/{args.json, log.jsonl, checkpoint.pth}.
"""
import argparse
import fcntl
import json
import math
import os
import sys
import time
import types

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import backbones
import views
from views import UserError

# Unset flags take these: multicrop, --recipe light | baseline (SSLight's moco_cnn_*.yaml); classic,
# MoCo-v2 as published (official main_moco.py --mlp --moco-t 0.2 --aug-plus --cos).
PAPER_DEFAULTS = {
    "multicrop": dict(optimizer="lars", lr=0.48, min_lr=0.0048, warmup_epochs=10, weight_decay=1e-6,
                      decay_all_params=0, lr_schedule="iter", hidden_dim=2048),
    "classic": dict(optimizer="sgd", lr=0.03, min_lr=0.0, warmup_epochs=0, weight_decay=1e-4,
                    decay_all_params=1, lr_schedule="epoch", hidden_dim=0),
}
PAPER_EPOCHS = 200
# Settings of this machine and command, never taken from a checkpoint.
THIS_RUN = {"output_dir", "workers", "log_every", "device", "amp", "export", "compile"}
# A resumed run may change these when typed again (a moved --data: its size is checked).
RESUMABLE = THIS_RUN | {"data", "eval_data", "eval_every", "epochs", "views_on"}
# Each numeric flag's range (None: the recipe's value), checked before anything is made.
FLAG_RANGES = dict(
    dict.fromkeys(["epochs", "batch_size", "log_every", "eval_every", "dim", "queue_size",
                   "bn_splits"], (1, math.inf)),
    **dict.fromkeys(["workers", "hidden_dim", "min_lr", "weight_decay"], (0, math.inf)),
    seed=(0, 2**32 - 1), momentum=(0, 1))
POSITIVE_FLAGS = ["lr", "temperature"]


def get_args_parser():
    parser = argparse.ArgumentParser(description="MoCo-v2 pre-training (SSLight recipes)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r = parser.add_argument_group("run")
    r.add_argument("--arch", default="mobilenet_v2", choices=backbones.ARCHS, help="the paper's")
    r.add_argument("--data", default="synthetic", help=views.DATA_HELP)
    r.add_argument("--output-dir", help="default runs/moco-<arch>; a rerun resumes its checkpoint")
    r.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help="paper 200; more extends a run")
    r.add_argument("--batch-size", type=int, default=128, help="per process; paper 128 x 8 GPUs")
    r.add_argument("--workers", type=int, help="per process; default: cores / processes, <= 8")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="auto: bf16 on GPUs >= sm80, fp16 below, off on the CPU; paper fp32")
    r.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    r.add_argument("--log-every", type=int, default=20, help="steps between updates (a host sync)")
    r.add_argument("--export", metavar="PATH", help="write the query backbone's weights to PATH")
    r.add_argument("--eval-data", help="kNN monitor, k 20, T 0.07: ROOT/{train,val} or a named set")
    r.add_argument("--eval-every", type=int, default=1, help="epochs between kNN evaluations")
    views.add_view_args(parser)
    m = parser.add_argument_group("MoCo (None = the recipe's value)")
    m.add_argument("--dim", type=int, default=128, help="embedding size")
    m.add_argument("--hidden-dim", type=int, help="paper 2048, classic 0 = the backbone's")
    m.add_argument("--queue-size", type=int, default=65536, help="K; 4096-16384 on small data sets")
    m.add_argument("--temperature", type=float, default=0.2, help="MoCo-v2 0.2 (v1 0.07)")
    m.add_argument("--momentum", type=float, default=0.999, help="key EMA; 0.99 for short runs")
    m.add_argument("--bn-splits", type=int, default=8, help="one process: key BN on sub-batches")
    m.add_argument("--key-sync-bn", type=int, choices=[0, 1], default=1,
                   help="CUDA torchrun: 1 (paper) SyncBN keys; 0 official MoCo's shuffle-BN")
    o = parser.add_argument_group("optimisation (None = the recipe's value)")
    o.add_argument("--optimizer", choices=["lars", "sgd", "adamw"], help="paper lars, classic sgd")
    o.add_argument("--lr", type=float, help="per 256 images: paper 0.48, classic 0.03")
    o.add_argument("--min-lr", type=float, help="cosine end: paper 0.0048, classic 0")
    o.add_argument("--warmup-epochs", type=float,
                   help="from lr 0: paper 10 of 200 epochs (5%% of a shorter run), classic 0")
    o.add_argument("--lr-schedule", choices=["iter", "epoch"], help="paper iter, classic epoch")
    o.add_argument("--weight-decay", type=float, help="paper 1e-6, classic 1e-4")
    o.add_argument("--decay-all-params", type=int, choices=[0, 1],
                   help="1 (classic): BN and biases decay too; 0: SSLight's 3 groups")
    return parser


def resolve_config(args, given, world_size, saved=None):
    """Flags + the recipe's defaults + the view recipe, once; a resume's: the checkpoint's."""
    check_ranges(vars(args), dict(FLAG_RANGES, warmup_epochs=(0, args.epochs)), POSITIVE_FLAGS)
    if saved is not None:
        return resumed_config(saved, vars(args), given, THIS_RUN, RESUMABLE)
    is_vit = backbones.is_vit(args.arch)
    recipe = views.recipe_from_flags("moco", args, is_vit, backbones.PATCH_SIZE)
    config = dict(vars(args), world_size=world_size)
    defaults = PAPER_DEFAULTS["classic" if args.recipe == "classic" else "multicrop"]
    config.update({key: value for key, value in defaults.items() if config[key] is None})
    if args.warmup_epochs is None:  # the warm-up keeps the fraction of the run it has in the paper
        config["warmup_epochs"] *= min(1.0, args.epochs / PAPER_EPOCHS)
    config.update(views.resolved_view_flags(recipe))
    if config["queue_size"] < config["batch_size"] * world_size:  # a step's keys must fit
        raise UserError(f"--queue-size {config['queue_size']} is smaller than the global batch "
                        f"{config['batch_size'] * world_size} (--batch-size x processes)")
    return types.SimpleNamespace(**config)


def check_ranges(flags, ranges, positive):
    """Each flags[name] (None: unset) finite, in ranges[name] = [low, high], > 0 if in positive."""
    for name, (low, high) in dict(ranges, **dict.fromkeys(positive, (0, math.inf))).items():
        value = flags[name]
        if value is not None and not (-math.inf < value < math.inf and low <= value <= high
                                      and (value > 0 or name not in positive)):
            must = ("> 0" if name in positive else f">= {low}" if high == math.inf else
                    f"in [{low}, {high}]")
            raise UserError(f"--{name.replace('_', '-')} must be {must} and finite, not {value}")


class MoCoHead(nn.Module):
    """Linear -> ReLU -> Linear, no BN, L2-normalised (SSLight's MOCOHead)."""

    def __init__(self, in_dim, hidden_dim, out_dim, trunc_normal_init=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))
        if trunc_normal_init:  # the paper's; MoCo-v2 keeps PyTorch's default init
            for layer in (self.mlp[0], self.mlp[2]):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x):
        return F.normalize(self.mlp(x).float(), dim=-1)  # in fp32: the logits are divided by T


class MoCoNet(nn.Module):
    """`backbone` + `head`: linear_eval.py reads checkpoint["query_encoder"]["backbone.*"]."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):  # the backbone once per resolution group, the head once (SSLight)
        return self.head(backbones.multicrop_features(self.backbone, crops))


def build_moco_net(arch, dim, hidden_dim, trunc_normal_init=True):
    backbone = backbones.build_backbone(arch)  # hidden_dim 0: its width (official MoCo's --mlp)
    head = MoCoHead(backbone.feat_dim, hidden_dim or backbone.feat_dim, dim, trunc_normal_init)
    return MoCoNet(backbone, head)


class MoCoQueue(nn.Module):
    """dim x K keys (random, normalised) and the write pointer, outside DDP, which would broadcast
    its 32 MB every step: every rank enqueues the same gathered keys, so the copies stay equal."""

    def __init__(self, dim, size, seed=0):
        super().__init__()
        keys = torch.randn(dim, size, generator=torch.Generator().manual_seed(seed))  # same on all
        self.register_buffer("keys", F.normalize(keys, dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys):
        """(n, dim) keys at the pointer, wrapping around; on the device: no host sync."""
        index = (self.ptr + torch.arange(len(keys), device=keys.device)) % self.keys.shape[1]
        self.keys.index_copy_(1, index, keys.T.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + len(keys)) % self.keys.shape[1])


def moco_logits(q, k, queue, temperature):
    """InfoNCE logits / T, (n_queries * B, 1 + K): column 0 the positive q.k, then q.queue. q is
    view-major (rows [v * B, (v + 1) * B) are query view v), k is (B, dim), queue (dim, K)."""
    n_queries = len(q) // len(k)
    positive = (q.view(n_queries, len(k), -1) * k).sum(-1).reshape(-1, 1)
    return torch.cat([positive, q @ queue], dim=1) / temperature


def moco_loss(logits, n_queries, alpha, beta):
    """alpha * CE(g2) + beta * mean_i CE(local_i), target index 0 (SSLight's MOCOLoss)."""
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    ce = F.cross_entropy(logits.float(), target, reduction="none").view(n_queries, -1).mean(1)
    return alpha * ce[0] + beta * ce[1:].mean() if n_queries > 1 else ce[0]


# ---- Keys without BN cheating (MoCo, He et al. CVPR 2020, Sec. 3.3) ----
# A query and its key must not share the BN statistics of one small group of images: the network
# would learn that signature instead of the images. The key encoder's running statistics are never
# used (kNN, --export and linear_eval.py read the query encoder).

def key_bn_mode(has_bn, world_size, key_sync_bn):
    """none: no BN (ViTs). split: one process, shuffled sub-batches. shuffle: across processes.
    sync: SyncBN statistics are the global batch's in any order, so a shuffle would change no key
    (the queued negatives still lack them: --key-sync-bn 0 is stricter, official MoCo issue #46)."""
    if has_bn and world_size > 1:
        return "sync" if key_sync_bn else "shuffle"
    return "split" if has_bn else "none"


def clamp_bn_splits(bn_splits, batch_size):
    """The largest divisor of the batch <= bn_splits leaving >= 2 images per split (BN needs 2)."""
    largest = max(1, min(bn_splits, batch_size // 2))
    return max(d for d in range(1, largest + 1) if batch_size % d == 0)


def split_bn_keys(key_encoder, images, bn_splits):
    """Official MoCo's CIFAR demo: shuffle, keys of bn_splits sub-batches, unshuffle."""
    perm = torch.randperm(len(images), device=images.device)
    keys = torch.cat([key_encoder([chunk]) for chunk in images[perm].chunk(bn_splits)])
    return keys[torch.argsort(perm)]


def shuffle_bn_keys(key_encoder, images):
    """Official MoCo: this rank's slice of every rank's images in rank 0's order, keys gathered and
    unshuffled; each rank returns its own images' keys."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    all_images = all_gather_cat(images)
    perm = torch.randperm(len(all_images), device=images.device)
    dist.broadcast(perm, src=0)  # one permutation for everyone
    keys = all_gather_cat(key_encoder([all_images[perm.view(world_size, -1)[rank]]]))
    return keys[torch.argsort(perm)].view(world_size, len(images), -1)[rank]


def moco_forward(query_encoder, key_encoder, crops, key_bn, bn_splits):
    """-> queries of [g2, l1..ln] (n_queries * B, dim), keys of g1 alone (B, dim) (SSLight)."""
    with torch.no_grad():
        k = (split_bn_keys(key_encoder, crops[0], bn_splits) if key_bn == "split" else
             shuffle_bn_keys(key_encoder, crops[0]) if key_bn == "shuffle" else
             key_encoder(crops[:1]))  # none, sync
    return query_encoder(crops[1:]), k


@torch.no_grad()
def ema_update(ema_params, params, momentum):
    """ema = m * ema + (1 - m) * online, parameters only: the EMA network's BN buffers come from its
    own train-mode forward. torch._foreach_lerp_: the whole list in one kernel."""
    torch._foreach_lerp_(ema_params, params, 1.0 - momentum)


def param_groups(modules, decay_all=False):
    """SSLight's three groups, trainable parameters only (decay_all: one group, MoCo-v2's way):
    regularized: ndim >= 2, not depthwise -> weight decay, LARS adaptation;
    depthwise:   4-D conv weights with shape[1] == 1 (MobileNetV2) -> no weight decay, LARS kept;
    plain:       biases and norm parameters (ndim < 2) -> no weight decay, no LARS."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if decay_all:
        return [dict(params=params, wd_factor=1.0, lars_exclude=False)]
    depthwise = lambda p: p.ndim == 4 and p.shape[1] == 1
    groups = [dict(params=[p for p in params if p.ndim >= 2 and not depthwise(p)], wd_factor=1.0,
                   lars_exclude=False),
              dict(params=[p for p in params if depthwise(p)], wd_factor=0.0, lars_exclude=False),
              dict(params=[p for p in params if p.ndim < 2], wd_factor=0.0, lars_exclude=True)]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """SSLight's LARS: g = grad + wd * p; unless lars_exclude, g *= eta * ||p|| / ||g|| when both
    norms are > 0; mu = momentum * mu + g; p -= lr * mu. eta 0.001, momentum 0.9, no Nesterov.
    torch._foreach_* end to end: a few kernels per group whatever its size, and no host sync."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if not group["lars_exclude"]:
                norms = torch.stack(torch._foreach_norm(params + list(grads))).view(2, -1)
                ratios = torch.where((norms > 0).all(0), group["eta"] * norms[0] / norms[1], 1.0)
                torch._foreach_mul_(grads, ratios.unbind())
            for p in params:  # the momentum buffers, made on the first step
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    rank, world_size, device = init_distributed(args.device, args.seed)
    log = print if rank == 0 else (lambda *a, **k: None)
    output_dir = args.output_dir or os.path.join("runs", f"moco-{args.arch}")
    checkpoint_path = os.path.join(output_dir, "checkpoint.pth")
    checkpoint = load_checkpoint(checkpoint_path, "moco", device)
    saved = checkpoint and checkpoint["config"]
    config = resolve_config(args, given_flags(parser, argv), world_size, saved)
    if config.export:
        check_export_path(config.export)
    config.amp, amp_note = resolve_amp(config.amp, device)
    config.workers = loader_workers(config.workers)
    done = checkpoint["epoch"] if checkpoint else 0
    if config.epochs < done:
        raise UserError(f"{checkpoint_path} has {done} finished epochs; --epochs {config.epochs} "
                        "cannot shorten it")
    if config.epochs == done:
        log(f"this run is finished: {done} epochs; {checkpoint_path}, {output_dir}/log.jsonl")
        if config.export and rank == 0:
            backbones.export_backbone(checkpoint["query_encoder"], config.export, config.arch)
        return dict(checkpoint=checkpoint)
    if checkpoint and saved["world_size"] != world_size:  # a finished run exports from any number
        raise UserError(f"resume on {saved['world_size']} process(es) as trained, not {world_size}")
    if saved and config.epochs != saved["epochs"]:
        log(f"extending the run from {saved['epochs']} to {config.epochs} epochs: new lr schedule")
    log(f"MoCo-v2 {config.arch} ({config.recipe}) | {world_size} process(es) on {device}, "
        f"amp {config.amp} {amp_note}| configuration:")
    log("\n".join(f"  {k}: {v}" for k, v in sorted(vars(config).items())))

    # ============ data: every path and size is checked before the run folder is made ============
    is_vit = backbones.is_vit(config.arch)
    recipe = views.recipe_from_flags("moco", config, is_vit, backbones.PATCH_SIZE)
    if rank != 0:
        barrier()  # rank 0 downloads a named data set first
    transform, collate, view_sampler = views.view_pipeline(recipe, config.views_on)
    dataset = views.build_dataset(config.data, transform, download=rank == 0)
    eval_sets = config.eval_data and views.build_eval_datasets(
        config.eval_data, views.eval_transform(config.global_size), download=rank == 0)
    if rank == 0:
        barrier()
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, seed=config.seed,
                                                  drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, config.batch_size, sampler=sampler,
                                         num_workers=config.workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=config.workers > 0)
    iters_per_epoch = len(loader)
    if iters_per_epoch == 0:
        raise UserError(f"{len(dataset)} images: fewer than --batch-size x processes")
    if checkpoint and checkpoint["num_images"] != len(dataset):
        raise UserError(f"--data {config.data} has {len(dataset)} images, the run was trained on "
                        f"{checkpoint['num_images']}: use the same data or another --output-dir")
    log(f"{len(dataset)} images, {iters_per_epoch} iterations/epoch")
    if rank == 0:  # every check has passed: only now is the run folder made (and locked)
        lock_output_dir(output_dir)

    # ============ query and key encoders, queue ============
    head_init = config.recipe != "classic"  # the paper's trunc-normal init; MoCo-v2's default
    query_encoder = build_moco_net(config.arch, config.dim, config.hidden_dim, head_init)
    key_encoder = build_moco_net(config.arch, config.dim, config.hidden_dim, head_init)
    memory_format = backbones.memory_format(config.arch, device)
    query_encoder = backbones.sync_batchnorm(query_encoder, device, world_size)
    if config.key_sync_bn:  # the paper's key encoder has SyncBN too
        key_encoder = backbones.sync_batchnorm(key_encoder, device, world_size)
    for net in (query_encoder, key_encoder):
        net.to(device, memory_format=memory_format)
    query_fwd, key_fwd = query_encoder, key_encoder
    if world_size > 1:  # DDP broadcasts rank 0's query encoder; the key encoder starts as its copy
        query_fwd = nn.parallel.DistributedDataParallel(query_encoder)
    key_encoder.load_state_dict(query_encoder.state_dict())
    key_encoder.requires_grad_(False)
    if config.compile:  # the forwards; the plain modules keep the state dicts and the EMA
        query_fwd, key_fwd = torch.compile(query_fwd), torch.compile(key_fwd)
    queue = MoCoQueue(config.dim, config.queue_size, seed=config.seed).to(device)
    bn = [m for m in key_encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    key_bn = key_bn_mode(bool(bn), world_size, any(isinstance(m, nn.SyncBatchNorm) for m in bn))
    bn_splits = clamp_bn_splits(config.bn_splits, config.batch_size) if key_bn == "split" else 1
    split = f", {bn_splits} shuffled sub-batches of {config.batch_size // bn_splits}"
    log(f"key encoder BN: {key_bn}" + (split if key_bn == "split" else ""))

    # ============ optimizer, lr schedule, resume ============
    groups = param_groups([query_encoder], decay_all=bool(config.decay_all_params))
    optimizer = (LARS(groups) if config.optimizer == "lars" else
                 torch.optim.SGD(groups, lr=0.0, momentum=0.9) if config.optimizer == "sgd" else
                 torch.optim.AdamW(groups, fused=device.type == "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    peak_lr = config.lr * config.batch_size * world_size / 256
    steps = iters_per_epoch if config.lr_schedule == "iter" else 1  # classic: per epoch
    per_step = cosine_schedule(peak_lr, config.min_lr, config.epochs, steps, config.warmup_epochs)
    lr_schedule = lambda it: per_step(it // (iters_per_epoch // steps))
    amp_dtype = torch.float16 if config.amp == "fp16" else torch.bfloat16
    autocast = torch.autocast(device.type, amp_dtype, enabled=config.amp != "off")
    evaluate = lambda: knn_monitor(query_encoder.backbone, *eval_sets, 256, config.workers, device,
                                   rank, world_size, autocast, memory_format)
    stateful = dict(query_encoder=query_encoder, key_encoder=key_encoder, queue=queue,
                    optimizer=optimizer, scaler=scaler)
    if checkpoint:
        for name, part in stateful.items():
            if checkpoint[name]:  # the scaler's is empty unless saved under fp16 (--amp may change)
                part.load_state_dict(checkpoint[name])
        log(f"resumed from {checkpoint_path} after epoch {done}")
    history = checkpoint["history"] if checkpoint else []
    if eval_sets and not checkpoint:
        history.append(dict(epoch=0, **evaluate()))
        log(f"epoch 0 (untrained): kNN top-1 {history[0]['knn_top1']:.2f} %")
    if rank == 0:  # written only once the settings have passed the checks
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(vars(config), f, indent=2)

    # One step: the EMA first (official MoCo: keys from this step's momentum encoder), keys of g1,
    # queries [g2, locals], fp32 logits (divided by T), backward, step; only then the queue takes
    # every rank's keys: negatives are past batches', and the backward reads the queue unchanged.
    query_params, key_params = list(query_encoder.parameters()), list(key_encoder.parameters())
    for epoch in range(done, config.epochs):
        sampler.set_epoch(epoch)
        query_encoder.train(), key_encoder.train()  # the keys use batch statistics (guarded)
        sums = torch.zeros(3, device=device)  # loss, contrastive top-1, key std
        start = time.time()
        bar = tqdm(views.Prefetcher(loader, device), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=rank != 0, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            it = epoch * iters_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(it)
                group["weight_decay"] = config.weight_decay * group["wd_factor"]
            crops = views.batch_to_crops(batch, device, memory_format, view_sampler)

            ema_update(key_params, query_params, config.momentum)
            with autocast:
                q, k = moco_forward(query_fwd, key_fwd, crops, key_bn, bn_splits)
            logits = moco_logits(q.float(), k.float(), queue.keys, config.temperature)
            loss = moco_loss(logits, 1 + config.local_crops, *config.loss_weights)

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            queue.enqueue(all_gather_cat(k))  # every rank's keys, in rank order

            # Contrastive top-1: the positive beats all K negatives. The per-dimension std of the
            # normalised keys is ~1/sqrt(dim) when they spread, ~0 when all are the same.
            accuracy = (logits.detach().argmax(1) == 0).float().mean()
            sums += torch.stack([loss.detach(), accuracy, k.float().std(0).mean()])
            del q, k, logits, loss  # free them before the next forward's peak
            if (i + 1) % config.log_every == 0 or i + 1 == iters_per_epoch:  # the one host sync
                means = (all_reduce_sum(sums.clone()) / ((i + 1) * world_size)).tolist()
                if not math.isfinite(means[0]):
                    kept = f"epoch {epoch}'s checkpoint is kept" if epoch else "no checkpoint yet"
                    advice = "a lower --lr" if config.amp == "off" else "--amp off or a lower --lr"
                    raise SystemExit(f"error: non-finite loss in epoch {epoch + 1}, step {i + 1}; "
                                     f"{kept}. Try {advice}")
                img_s = (i + 1) * config.batch_size * world_size / (time.time() - start)
                bar.set_postfix(loss=f"{means[0]:.4f}", acc=f"{means[1]:.3f}",
                                lr=f"{lr_schedule(it):.2e}", img_s=round(img_s, 1))

        # ============ end of epoch: record, monitor, checkpoint ============
        chance = math.log(config.queue_size + 1)  # the loss of a positive no better than a negative
        record = dict(epoch=epoch + 1, loss=means[0], contrastive_top1=round(100 * means[1], 2),
                      embedding_std=means[2], chance_loss=chance, lr=lr_schedule(it),
                      wd=config.weight_decay, momentum=config.momentum, img_per_s=round(img_s, 1))
        if eval_sets and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            record.update(evaluate())
        history.append(record)
        untrained = f" (untrained {history[0]['knn_top1']:.2f})" if history[0]["epoch"] == 0 else ""
        knn = f", kNN top-1 {record['knn_top1']:.2f} %{untrained}" if "knn_top1" in record else ""
        log(f"epoch {epoch + 1}/{config.epochs}: loss {means[0]:.4f} (ln(K+1) {chance:.3f}), "
            f"contrastive top-1 {100 * means[1]:.1f} %, key std {means[2]:.4f} "
            f"(~{1 / math.sqrt(config.dim):.3f} healthy){knn}")
        same_keys, at_chance = means[2] < 0.01 / math.sqrt(config.dim), means[0] >= 0.99 * chance
        if same_keys or at_chance:
            what = "every image gives the same key" if same_keys else "the loss is at chance"
            log(f"collapse: {what} (key std {means[2]:.2e}, loss {means[0]:.3f} of ln(K+1) "
                f"{chance:.3f}). Try a lower --lr, --momentum 0.99 on short runs, --temperature "
                "0.2, or a smaller --queue-size on small data sets (stale keys)")
        if rank == 0:
            states = {name: part.state_dict() for name, part in stateful.items()}
            save_checkpoint(dict(states, method="moco", config=vars(config), epoch=epoch + 1,
                                 num_images=len(dataset), history=history), checkpoint_path)
            write_log(os.path.join(output_dir, "log.jsonl"), history)

    if config.export and rank == 0:
        backbones.export_backbone(query_encoder.state_dict(), config.export, config.arch)
    barrier()
    return dict(query_encoder=query_encoder, key_encoder=key_encoder, queue=queue, history=history)


# ---- plumbing: shared by the scripts, one text per function in every script that has it ----
# (tests/test_plumbing.py). Written out in each script, as official MoCo repeats its helpers in
# main_moco.py and main_lincls.py, so that a script can be copied with backbones.py and views.py
# alone. A script carries only the functions it calls; they take explicit values, not `args`.

def init_distributed(device_name, seed):
    """-> (rank, world_size, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python
    script.py` is one process without a process group, and every collective below is a no-op."""
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is visible")
    rank, world_size, device = 0, 1, torch.device("cuda" if use_cuda else "cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if use_cuda and per_node > gpus:  # NCCL refuses 2 processes on 1 GPU, in a traceback
            raise UserError(f"{per_node} processes on this node but {gpus} GPU(s): use "
                            f"--nproc_per_node={gpus}, or --device cpu")
        if use_cuda:  # modulo: a launcher may show each process only its own GPU (SLURM)
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % gpus)
            torch.cuda.set_device(device)
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, device_id=device if use_cuda else None)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed + rank)
    return rank, world_size, device


def given_flags(parser, argv=None):
    """The names of the flags typed on the command line (their defaults are not in it)."""
    unset = object()
    typed = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    return {name for name, value in vars(typed).items() if value is not unset}


def resumed_config(saved, now, given, this_run, resumable):
    """A resumed run's configuration: the checkpoint's (`saved`), with this run's settings
    (`this_run`) and the resumable flags typed now taken from `now` (the parsed flags, a dict). Any
    other typed flag with another value is refused, naming each one old -> new."""
    plain = lambda v: tuple(v) if isinstance(v, list) else v
    changed = {k: (saved[k], now[k]) for k in sorted(given - resumable)
               if plain(now[k]) != plain(saved[k])}
    if changed:
        raise UserError("this run was trained with other settings; use another --output-dir or the "
                        "same flags: " + ", ".join(f"--{k.replace('_', '-')} {old} -> {new}"
                                                   for k, (old, new) in changed.items()))
    now_wins = this_run | (given & resumable)
    return types.SimpleNamespace(**dict(saved, **{k: now[k] for k in now_wins}))


def resolve_amp(amp, device):
    """-> (autocast dtype name or "off", a note). auto: bf16 on GPUs of compute capability >= 8.0,
    fp16 (+ GradScaler) below, where cuDNN has no fast bf16 convolutions; off on the CPU. An
    explicit value holds on any device: the CPU runs the same AMP branches."""
    note, cuda = "", device.type == "cuda"
    if amp == "auto" and cuda and torch.cuda.get_device_capability(device) < (8, 0):
        amp, note = "fp16", "(compute capability < 8.0: fp16, bf16 convolutions would be slow) "
    elif amp == "auto":
        amp = "bf16" if cuda else "off"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: cuDNN picks its fastest kernels
        torch.set_float32_matmul_precision("high" if amp != "off" else "highest")  # off: no TF32
    return amp, note


def loader_workers(requested):
    """--workers, or by default this node's cores shared among its processes (torchrun's
    LOCAL_WORLD_SIZE), at most 8: 8 GPUs x 8 workers on a 64-core node, not 8 x 64."""
    if requested is not None:
        return requested
    return min(8, max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor):
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def all_gather_cat(tensor):
    """Every rank's `tensor` concatenated along dim 0, in rank order (no gradient)."""
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()  # one plain layout for sent and received buffers
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered)


def barrier():
    if is_distributed():
        dist.barrier()


def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0.0, start_warmup=0.0):
    """iteration -> value, as official DINO's utils.cosine_scheduler without its list of every step:
    linear start_warmup -> base over warmup_epochs (may be fractional), then a cosine to final."""
    warmup_iters, total = int(warmup_epochs * iters_per_epoch), int(epochs * iters_per_epoch)
    rest = max(1, total - warmup_iters)
    cosine = lambda i: final + (base - final) * (1 + math.cos(math.pi * i / rest)) / 2
    return lambda i: (start_warmup + (base - start_warmup) * i / warmup_iters if i < warmup_iters
                      else cosine(i - warmup_iters))


def check_export_path(path):
    """--export is written after the last epoch: a path that cannot be written fails now."""
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):  # export_backbone makes the missing folders
        existing = os.path.dirname(existing)
    if os.path.isdir(path) or not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UserError(f"--export {path}: cannot be written (a folder, under a file, read-only)")


HELD_LOCKS = {}  # lock file -> its open handle, for the rest of this process


def lock_output_dir(output_dir):
    """Make OUTPUT_DIR and hold an exclusive lock on OUTPUT_DIR/lock, so that two runs never write
    one folder. The kernel drops the lock when this process ends, however it ends: no stale lock."""
    path = os.path.realpath(os.path.join(output_dir, "lock"))
    if path in HELD_LOCKS:  # this process holds it already (main() called again, as tests do)
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        handle = open(path, "a")
    except OSError as error:
        raise UserError(f"--output-dir {output_dir}: cannot write ({error.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(f"{output_dir} is in use by another run: wait for it, or use another "
                        "--output-dir") from None
    HELD_LOCKS[path] = handle


def save_checkpoint(state, path):
    """Atomic: write PATH.tmp, then rename it to PATH, so that a kill at any moment leaves the last
    complete checkpoint. A failed write (disk full) stops the run in one line, the old one kept."""
    try:
        torch.save(state, f"{path}.tmp")
    except (OSError, RuntimeError) as error:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")
        raise UserError(f"could not write the checkpoint {path} ({error}); the last one is "
                        "kept") from None
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path, method, device):
    """PATH's saved state, or None. An unreadable file, another method's run, or ranks that see
    different ones (nodes with disks of their own) stop in one line, on every rank at once."""
    try:
        checkpoint = os.path.exists(path) and torch.load(path, "cpu", weights_only=False)
    except Exception as error:
        raise UserError(f"cannot read {path} ({type(error).__name__}: {str(error)[:200]}); move it "
                        "away to start the run again") from None
    seen = all_gather_cat(torch.tensor([checkpoint["epoch"] if checkpoint else -1], device=device))
    if len(set(seen.tolist())) > 1:  # rank 0's node would resume, the others start over: a hang
        raise UserError(f"the processes see different checkpoints in {path}: --output-dir must be "
                        "one folder that all nodes share (a shared file system)")
    if checkpoint and checkpoint.get("method") != method:
        raise UserError(f"--output-dir holds a {checkpoint.get('method')} run, not a {method} one")
    return checkpoint or None


def write_log(path, records):
    """log.jsonl = exactly these records, one JSON line each, replaced atomically: after any kill
    and resume it holds one line per finished epoch (the records travel in the checkpoint)."""
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(f"{path}.tmp", path)


@torch.no_grad()
def extract_features(feature_fn, dataset, batch_size, workers, device, rank, world_size, autocast,
                     memory_format=torch.contiguous_format):
    """Features of the whole `dataset`, in its order, on every rank: rank r extracts the images
    r, r + W, r + 2W, ... (DistributedSampler pads the last round with the first images, so that
    no rank idles into the NCCL timeout or has none), then all ranks gather them."""
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    features, labels = [], []
    for images, targets in loader:
        with autocast:
            features.append(feature_fn(views.normalize(images, device, memory_format)).float())
        labels.append(torch.as_tensor(targets).to(device))
    # (rank, position) -> position-major: the dataset's order, then the padding dropped
    in_order = lambda parts: (all_gather_cat(torch.cat(parts)).unflatten(0, (world_size, -1))
                              .transpose(0, 1).flatten(0, 1)[:len(dataset)])
    return in_order(features), in_order(labels).long()


@torch.no_grad()
def knn_classify(bank, bank_labels, queries, query_labels, num_classes, k=20, temperature=0.07,
                 chunk=512):
    """Weighted kNN (official DINO eval_knn.py): the k most cosine-similar bank images vote for
    their class with weight exp(sim / T). -> (top-1 %, top-5 %). Bank images labelled -1 abstain."""
    keep = bank_labels >= 0
    bank, bank_labels = F.normalize(bank[keep].float(), dim=1), bank_labels[keep]
    k, top, hits = min(k, len(bank)), min(5, num_classes), torch.zeros(2, device=bank.device)
    for start in range(0, len(queries), chunk):
        query = F.normalize(queries[start:start + chunk].float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(similarity), num_classes, device=bank.device)
        # exp((sim - 1) / T): the same ranking as exp(sim / T), without overflow
        votes.scatter_add_(1, bank_labels[index], ((similarity - 1) / temperature).exp())
        hit = votes.topk(top, dim=1).indices == query_labels[start:start + chunk, None]
        hits += torch.stack([hit[:, 0].sum(), hit.any(1).sum()])
    return tuple((100.0 * hits / max(1, len(queries))).tolist())


def knn_monitor(backbone, bank_set, val_set, batch_size, workers, device, rank, world_size,
                autocast, memory_format=torch.contiguous_format):
    """kNN top-1 / top-5 (k 20, T 0.07) of `backbone` in eval mode, train bank -> val."""
    was_training = backbone.training
    backbone.eval()
    extract = lambda dataset: extract_features(backbone, dataset, batch_size, workers, device, rank,
                                               world_size, autocast, memory_format)
    (bank, bank_labels), (val, val_labels) = extract(bank_set), extract(val_set)
    backbone.train(was_training)
    num_classes = max(len(getattr(bank_set, "classes", ())), int(bank_labels.max()) + 1)
    top1, top5 = knn_classify(bank, bank_labels, val, val_labels, num_classes)
    return dict(knn_top1=round(top1, 2), knn_top5=round(top5, 2))
# ---- end of plumbing ----


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
