"""SwAV pre-training with the paper's view sampling (SSLight, Tan, Saleh, Martinez, ICLR 2023).

    python swav.py                                    # the CPU demo on the built-in synthetic set
    torchrun --nproc_per_node=8 swav.py --data /path/imagenet/train    # the paper: 8 x 128 images

One network sees every crop. Sinkhorn-Knopp spreads the 2 global crops (and a queue of past ones)
evenly over K = 3000 prototypes, and every other crop must predict those codes ("swapped
prediction"). No teacher, no EMA. Defaults are the paper's (SSLight's exp_yamls/swav).
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

PAPER_EPOCHS = 200
# The paper's warm-ups in epochs of its 200; a shorter run keeps their share (5 %, 7.5 %, 0.5 %).
PAPER_WARMUPS = dict(warmup_epochs=10, epoch_queue_starts=15, freeze_prototypes_epochs=1)
# Settings of this machine, never from a checkpoint; and the flags a resumed run may change.
THIS_RUN = {"output_dir", "workers", "log_every", "device", "amp", "export", "compile"}
RESUMABLE = THIS_RUN | {"data", "eval_data", "eval_every", "epochs", "views_on"}
# Each numeric flag's range (None: the paper's, scaled), checked before anything is made.
FLAG_RANGES = dict(  # num_prototypes 1 would be a one-way softmax: constant, a loss of exactly 0
    dict.fromkeys(["epochs", "batch_size", "hidden_dim", "feat_dim", "sinkhorn_iterations",
                   "log_every", "eval_every"], (1, math.inf)), num_prototypes=(2, math.inf),
    **dict.fromkeys(["workers", "queue_length", "epoch_queue_starts", "freeze_prototypes_epochs",
                     "start_warmup", "min_lr", "weight_decay"], (0, math.inf)), seed=(0, 2**32 - 1))
POSITIVE_FLAGS = ["lr", "temperature", "epsilon"]


def get_args_parser():
    parser = argparse.ArgumentParser(description="SwAV pre-training (SSLight recipes)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r = parser.add_argument_group("run")
    r.add_argument("--arch", default="mobilenet_v2", choices=backbones.ARCHS, help="the paper's")
    r.add_argument("--data", default="synthetic", help=views.DATA_HELP)
    r.add_argument("--output-dir", help="default runs/swav-<arch>; a rerun resumes its run")
    r.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help="paper 200; more extends a run")
    r.add_argument("--batch-size", type=int, default=128, help="per process; paper 128 x 8 GPUs")
    r.add_argument("--workers", type=int, help="default: the node's cores / processes, at most 8")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="auto: bf16 (fp16 below compute capability 8.0), off on CPU; paper: fp32")
    r.add_argument("--compile", action="store_true", help="torch.compile the network")
    r.add_argument("--log-every", type=int, default=20, help="steps between logs (one sync each)")
    r.add_argument("--export", metavar="PATH", help="the backbone, at the end (CNN: torchvision's)")
    r.add_argument("--eval-data", help="kNN monitor (k 20, T 0.07): ROOT/{train,val}, cifar10, ...")
    r.add_argument("--eval-every", type=int, default=1, help="epochs between kNN evaluations")
    views.add_view_args(parser)
    m = parser.add_argument_group("SwAV head, codes and queue (None: the paper's, scaled to a run)")
    m.add_argument("--hidden-dim", type=int, default=4096, help="projection width (SwAV's: 2048)")
    m.add_argument("--feat-dim", type=int, default=128, help="the embedding the prototypes score")
    m.add_argument("--num-prototypes", type=int, default=3000, help="K; a loss at ln K is collapse")
    m.add_argument("--temperature", type=float, default=0.1,
                   help="T of the prediction; codes stay informative only while the crops' scores "
                   "agree by more than epsilon / T (small batches: 0.025 / 0.2, README)")
    m.add_argument("--epsilon", type=float, default=0.05, help="Sinkhorn's; see --temperature")
    m.add_argument("--sinkhorn-iterations", type=int, default=3)
    m.add_argument("--freeze-prototypes-epochs", type=float,
                   help="the prototypes are not updated for this long: paper 1 of 200 epochs")
    m.add_argument("--queue-length", type=int, default=3840,
                   help="per global crop, trimmed to a multiple of the global batch (3072 at 1024);"
                        " 0: none. If the loss rises when it starts, start it later or shorten it")
    m.add_argument("--epoch-queue-starts", type=float,
                   help="the queue is made then, and used once full: paper 15 of 200 epochs")
    o = parser.add_argument_group("optimisation (paper: LARS, constant weight decay, no clipping)")
    o.add_argument("--optimizer", default="lars", choices=["lars", "sgd"],
                   help="paper: lars; a run of a few hundred steps learns with sgd (momentum 0.9)")
    o.add_argument("--lr", type=float, default=0.3, help="per 256 images: peak = lr x batch / 256")
    o.add_argument("--start-warmup", type=float, default=0.075,
                   help="lr at iteration 0 (absolute); capped at the peak (a global batch < 64)")
    o.add_argument("--min-lr", type=float, default=0.0048, help="end of the cosine (absolute)")
    o.add_argument("--warmup-epochs", type=float, help="from --start-warmup: paper 10 of 200")
    o.add_argument("--weight-decay", type=float, default=1e-6, help="constant")
    return parser


def resolve_config(args, given, world_size, saved=None):
    """The run's whole configuration, once; on a resume the checkpoint's, checked against flags."""
    check_ranges(vars(args), dict(FLAG_RANGES, warmup_epochs=(0, args.epochs)), POSITIVE_FLAGS)
    if saved is not None:
        return resumed_config(saved, vars(args), given, THIS_RUN, RESUMABLE)
    config = dict(vars(args), world_size=world_size)
    for name, paper_epochs in PAPER_WARMUPS.items():
        if config[name] is None:
            config[name] = paper_epochs * min(1.0, args.epochs / PAPER_EPOCHS)
    vit = backbones.is_vit(args.arch)
    recipe = views.recipe_from_flags("swav", args, vit, backbones.PATCH_SIZE)
    config.update(views.resolved_view_flags(recipe))
    batch = args.batch_size * world_size
    if 0 < args.queue_length < batch:
        raise UserError(f"--queue-length {args.queue_length} holds less than one global batch "
                        f"({args.batch_size} x {world_size} = {batch}): use 0 or at least {batch}")
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


class SwAVNet(nn.Module):
    """backbone -> Linear(4096) -> BN -> ReLU -> Linear(128) -> L2-normalise -> prototypes (K, no
    bias). forward -> (embeddings, scores), view-major: rows [v * B, (v + 1) * B) are view v."""

    def __init__(self, backbone, hidden_dim=4096, feat_dim=128, num_prototypes=3000):
        super().__init__()
        self.backbone = backbone  # "backbone.*": what linear_eval.py loads
        self.projection = nn.Sequential(nn.Linear(backbone.feat_dim, hidden_dim),
                                        nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, feat_dim))
        self.prototypes = nn.Linear(feat_dim, num_prototypes, bias=False)
        # The paper re-initialises the whole module (BN: PyTorch's 1, 0); a ViT keeps its own init.
        vit = getattr(backbone, "is_vit", False)
        for m in [*self.projection, self.prototypes] if vit else self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def normalize_prototypes(self):  # on the unit sphere: the scores are cosines (official SwAV)
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, crops):
        features = backbones.multicrop_features(self.backbone, crops)
        embeddings = F.normalize(self.projection(features), dim=1)
        # fp32 scores under autocast: Sinkhorn divides them by 0.05, bf16 would move the codes.
        with torch.autocast(embeddings.device.type, enabled=False):
            embeddings = embeddings.float()  # cast once: returned and scored
            return embeddings, self.prototypes(embeddings)


def build_swav_net(arch, hidden_dim=4096, feat_dim=128, num_prototypes=3000):
    return SwAVNet(backbones.build_backbone(arch), hidden_dim, feat_dim, num_prototypes)


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iterations=3):
    """(B_local, K) scores -> codes: rows sum to 1, each prototype gets ~B / K of the B samples of
    all processes (official SwAV's distributed_sinkhorn). fp32: exp(1 / 0.05) overflows fp16. Each
    prototype's global max is subtracted (the first normalisation cancels it): no overflow."""
    distributed = dist.is_available() and dist.is_initialized()  # else one process: no reduces
    scores = scores.float()
    shift = scores.max(dim=0).values  # (K,)
    if distributed:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    Q = torch.exp((scores - shift) / epsilon).t()  # K x B_local
    K, B = Q.shape[0], Q.shape[1] * (dist.get_world_size() if distributed else 1)
    total = Q.sum()
    if distributed:
        dist.all_reduce(total)
    Q /= total
    for _ in range(iterations):
        per_prototype = Q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(per_prototype)
        Q /= per_prototype  # each prototype: total mass 1 / K
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)  # each sample: mass 1 / B (a sample is local: no reduce)
        Q /= B
    return (Q * B).t()


class EmbeddingQueue(nn.Module):
    """This process's FIFO of the last `rows` embeddings of g1 and g2 (2 x rows x D), outside DDP;
    Sinkhorn's all-reduces combine the processes'. Its fill is counted on the host: no sync."""

    def __init__(self, rows, dim):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(2, rows, dim))
        self.filled = 0

    def full(self):
        return self.filled >= self.embeddings.shape[1]

    @torch.no_grad()
    def restore(self, embeddings):  # filled rows are non-zero (an embedding has norm 1)
        self.embeddings.copy_(embeddings)
        self.filled = int(self.embeddings.any(dim=2).any(dim=0).sum())

    @torch.no_grad()
    def push(self, new):  # (2, B, D) to the front, the rest B rows back
        batch = new.shape[1]
        self.embeddings[:, batch:] = self.embeddings[:, :-batch].clone()
        self.embeddings[:, :batch] = new
        self.filled = min(self.filled + batch, self.embeddings.shape[1])


def queue_rows(queue_length, batch_size, world_size):
    """Per process, of whole global batches: 3840 -> 3072 at 1024 -> 384 per GPU (SSLight's)."""
    return queue_length // (batch_size * world_size) * batch_size


@torch.no_grad()
def assign_codes(scores, embeddings, prototypes, queue, batch, epsilon=0.05, iterations=3):
    """The 2 global crops' codes. A full queue's scores go in front of the batch's, so that Sinkhorn
    spreads more samples than a small batch; then this step's embeddings join the queue."""
    codes = []
    for i in range(2):
        s = scores[i * batch:(i + 1) * batch].float()
        if queue is not None and queue.full():
            s = torch.cat([queue.embeddings[i] @ prototypes.float().t(), s])
        codes.append(sinkhorn(s, epsilon, iterations)[-batch:])
    if queue is not None:
        queue.push(embeddings[:2 * batch].float().view(2, batch, -1))
    return codes


def swapped_prediction_loss(scores, codes, local_crops, alpha, beta, temperature=0.1):
    """alpha * mean(global-global CE) + beta * mean(global-local CE) (the paper's Sec. 3.3.4), CE =
    -sum_k q_a log softmax(s_v / T); alpha 1 / (1 + n_local): official SwAV's mean of all pairs."""
    logp = F.log_softmax(scores.float() / temperature, dim=1).unflatten(0, (2 + local_crops, -1))
    # Elementwise in fp32 (a matmul would run in TF32 on CUDA): (2, n_crops) batch-mean CEs.
    ce = torch.stack([-(code * logp).sum(-1).mean(-1) for code in codes])
    global_global = (ce[0, 1] + ce[1, 0]) / 2
    if local_crops == 0:
        return global_global
    return alpha * global_global + beta * ce[:, 2:].sum() / (2 * local_crops)


@torch.no_grad()
def collapse_signals(embeddings, scores, codes, batch):
    """-> (embedding std per dimension: ~1/sqrt(D) spread, ~0 collapsed; mean code entropy: ~ln K
    when flat; each global crop's top prototype), without a host sync."""
    code = torch.cat(codes)
    code_entropy = -(code * code.clamp_min(1e-12).log()).sum(1).mean()
    return embeddings.float().std(0).mean(), code_entropy, scores[:2 * batch].argmax(1)


def collapse_form(loss, embedding_std, code_entropy, used, num_prototypes, feat_dim, epoch):
    """None for a healthy epoch, or which collapse (epoch counts from 1). Flat: every prototype
    scores alike, so the codes are uniform (entropy ~ ln K), the embeddings lose their spread,
    or the loss still sits at ln K after 2 epochs. Concentrated: a few prototypes take every
    image while the spread shrinks. The thresholds hold on the demo's runs (README)."""
    ln_k, healthy_std = math.log(num_prototypes), 1 / math.sqrt(feat_dim)
    if (code_entropy > 0.99 * ln_k or embedding_std < 0.1 * healthy_std
            or (epoch >= 3 and loss > 0.98 * ln_k)):
        return "flat codes, every prototype scores alike"
    if used < num_prototypes / 4 and embedding_std < 0.2 * healthy_std:
        return f"concentrated codes, a few of {num_prototypes} prototypes take every image"
    return None


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
    output_dir = args.output_dir or os.path.join("runs", f"swav-{args.arch}")
    checkpoint_path = os.path.join(output_dir, "checkpoint.pth")
    checkpoint = load_checkpoint(checkpoint_path, "swav", device)
    saved = checkpoint and checkpoint["config"]
    config = resolve_config(args, given_flags(parser, argv), world_size, saved)
    if config.export:
        check_export_path(config.export)
    config.amp, amp_note = resolve_amp(config.amp, device)
    config.workers = loader_workers(config.workers)
    done = checkpoint["epoch"] if checkpoint else 0
    if config.epochs < done:
        raise UserError(f"--epochs {config.epochs} is below the {done} epochs in {checkpoint_path}")
    if done == config.epochs:
        log(f"this run is finished: {done} epochs; checkpoint {checkpoint_path}")
        if config.export and rank == 0:
            backbones.export_backbone(checkpoint["model"], config.export, config.arch)
        return dict(checkpoint=checkpoint)
    if checkpoint and saved["world_size"] != world_size:  # a finished run exports from any number
        raise UserError(f"resume on {saved['world_size']} process(es) as trained, not {world_size}")
    if saved and config.epochs != saved["epochs"]:
        log(f"extending the run from {saved['epochs']} to {config.epochs} epochs (new lr schedule)")
    recipe = views.recipe_from_flags("swav", config, backbones.is_vit(config.arch),
                                     backbones.PATCH_SIZE)
    alpha, beta = config.loss_weights
    global_batch = config.batch_size * world_size
    rows = queue_rows(config.queue_length, config.batch_size, world_size)
    log(f"SwAV {config.arch} | {world_size} process(es) on {device}, amp {config.amp} {amp_note}| "
        f"queue {rows * world_size} of --queue-length {config.queue_length}")
    log("configuration:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(vars(config).items())))
    peak_lr = config.lr * global_batch / 256
    start_warmup = min(config.start_warmup, peak_lr)  # never a warm-up downwards
    if start_warmup < config.start_warmup:
        log(f"note: --start-warmup {config.start_warmup} is above the peak lr {peak_lr:.4g} of a "
            f"global batch of {global_batch}: the warm-up starts at the peak")

    if rank != 0:
        barrier()  # rank 0 downloads a named data set first
    transform, collate, view_sampler = views.view_pipeline(recipe, config.views_on)
    dataset = views.build_dataset(config.data, transform, download=rank == 0)
    eval_sets = config.eval_data and views.build_eval_datasets(
        config.eval_data, views.eval_transform(config.global_size), download=rank == 0)
    if rank == 0:
        barrier()
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True,
                                                  seed=config.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, config.batch_size, sampler=sampler, num_workers=config.workers, collate_fn=collate,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=config.workers > 0)
    iters_per_epoch = len(loader)
    if iters_per_epoch == 0:
        raise UserError(f"{len(dataset)} images give {len(sampler)} per process, fewer than "
                        f"--batch-size {config.batch_size}")
    if checkpoint and checkpoint["num_images"] != len(dataset):
        raise UserError(f"--data {config.data} now has {len(dataset)} images, the run was trained "
                        f"on {checkpoint['num_images']}: use the same data or another --output-dir")
    log(f"{len(dataset)} images: {iters_per_epoch} steps of {config.batch_size} x {world_size}")
    if rank == 0:  # every check has passed: only now is the run folder made
        lock_output_dir(output_dir)

    memory_format = backbones.memory_format(config.arch, device)
    model = build_swav_net(config.arch, config.hidden_dim, config.feat_dim, config.num_prototypes)
    model = backbones.sync_batchnorm(model, device, world_size)
    model = model.to(device, memory_format=memory_format)
    model_ddp = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    model_fwd = torch.compile(model_ddp) if config.compile else model_ddp  # `model`: the weights
    queue = None  # made after --epoch-queue-starts epochs, one per process, outside DDP
    groups = param_groups([model])
    optimizer = (LARS(groups) if config.optimizer == "lars"
                 else torch.optim.SGD(groups, lr=0.0, momentum=0.9))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    lr_schedule = cosine_schedule(peak_lr, config.min_lr, config.epochs, iters_per_epoch,
                                  config.warmup_epochs, start_warmup=start_warmup)
    # In iterations, so that a fraction of an epoch (a short run's share of the paper's) works.
    freeze_iters = int(config.freeze_prototypes_epochs * iters_per_epoch)
    queue_start = int(config.epoch_queue_starts * iters_per_epoch)
    half = torch.float16 if config.amp == "fp16" else torch.bfloat16
    autocast = torch.autocast(device.type, half, enabled=config.amp != "off")
    knn = lambda: knn_monitor(model.backbone, *eval_sets, 256, config.workers, device, rank,
                              world_size, autocast)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty unless saved under fp16
            scaler.load_state_dict(checkpoint["scaler"])
        if checkpoint["queue"] is not None:  # (processes, 2, rows, D): each resumes its own
            queue = EmbeddingQueue(rows, config.feat_dim).to(device)
            queue.restore(checkpoint["queue"][rank])
        history = checkpoint["history"]
        log(f"resumed from {checkpoint_path} after epoch {done} of {config.epochs}")
    else:  # the untrained network's kNN, as epoch 0
        history = [dict(epoch=0, **knn())] if eval_sets else []
        if history:
            log(f"epoch 0 (untrained): kNN top-1 {history[0]['knn_top1']:.2f} %")
    if rank == 0:
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(vars(config), f, indent=2)

    # One step: the prototypes back on the unit sphere (scores are cosines); one forward of every
    # crop; the global crops' codes, without gradient (Sinkhorn over the full queue too), and only
    # then do their embeddings join the queue, so that no sample is counted twice; the loss and its
    # backward; no prototype gradient while they are frozen; the optimizer step. The loss and the
    # collapse signals are summed on the device, read by the host every --log-every steps (a sync).
    for epoch in range(done, config.epochs):
        sampler.set_epoch(epoch)
        sums = torch.zeros(3, device=device)  # loss, embedding std, code entropy
        top_prototypes = torch.zeros(config.num_prototypes, device=device)  # 1: some crop's top
        start = time.time()
        bar = tqdm(views.Prefetcher(loader, device), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=rank != 0, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            it = epoch * iters_per_epoch + i  # global iteration: index into the schedule
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(it)
                group["weight_decay"] = config.weight_decay * group["wd_factor"]
            if queue is None and rows > 0 and it >= queue_start:
                queue = EmbeddingQueue(rows, config.feat_dim).to(device)
                log(f"queue started at epoch {epoch + 1}, step {i + 1}, used once full")
            crops = views.batch_to_crops(batch, device, memory_format, view_sampler)
            model.normalize_prototypes()
            with autocast:
                embeddings, scores = model_fwd(crops)
            # Codes and loss in fp32, outside autocast: exp(score / epsilon) overflows fp16.
            codes = assign_codes(scores.detach(), embeddings.detach(), model.prototypes.weight,
                                 queue, config.batch_size, config.epsilon,
                                 config.sinkhorn_iterations)
            loss = swapped_prediction_loss(scores, codes, config.local_crops, alpha, beta,
                                           config.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if it < freeze_iters:
                # None, not 0: LARS skips it (no decay, no momentum). Prototypes that move while the
                # codes are still random are a known cause of collapse (official SwAV).
                model.prototypes.weight.grad = None
            scaler.step(optimizer)
            scaler.update()
            std, entropy, top = collapse_signals(embeddings.detach(), scores.detach(), codes,
                                                 config.batch_size)
            sums += torch.stack([loss.detach(), std, entropy])
            top_prototypes.index_fill_(0, top, 1.0)
            del embeddings, scores, codes, loss, top  # freed before the next forward's peak
            if (i + 1) % config.log_every == 0 or i + 1 == iters_per_epoch:  # the one host sync
                means = (all_reduce_sum(sums.clone()) / ((i + 1) * world_size)).tolist()
                if not math.isfinite(means[0]):
                    raise SystemExit(f"error: non-finite loss in epoch {epoch + 1}, step {i + 1}; "
                                     "the last checkpoint is kept. Try a lower --lr or --amp off")
                bar.set_postfix(loss=f"{means[0]:.4f}", lr=f"{lr_schedule(it):.2e}",
                                img_s=round((i + 1) * global_batch / (time.time() - start), 1))

        used = int(all_reduce_sum(top_prototypes).count_nonzero())
        ln_k, healthy_std = math.log(config.num_prototypes), 1 / math.sqrt(config.feat_dim)
        record = dict(epoch=epoch + 1, loss=means[0], embedding_std=means[1], code_entropy=means[2],
                      ln_k=ln_k, prototypes_used=used, lr=lr_schedule(it), wd=config.weight_decay,
                      queue_full=queue is not None and queue.full(),
                      img_per_s=round(iters_per_epoch * global_batch / (time.time() - start), 1))
        if eval_sets and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            record.update(knn())
        history.append(record)
        knn_note = f", kNN top-1 {record['knn_top1']:.2f} %" if "knn_top1" in record else ""
        log(f"epoch {epoch + 1}/{config.epochs}: loss {means[0]:.4f} (ln K {ln_k:.3f}), embedding "
            f"std {means[1]:.4f} (~{healthy_std:.3f} healthy), {used} of {config.num_prototypes} "
            f"prototypes used{knn_note}")
        form = collapse_form(means[0], means[1], means[2], used, config.num_prototypes,
                             config.feat_dim, epoch + 1)
        if form:
            log(f"collapse: {form} (loss {means[0]:.3f} of ln K {ln_k:.3f}, code entropy "
                f"{means[2]:.3f}, embedding std {means[1]:.2e}, {used} prototypes used). The head "
                "learns only while two crops' scores agree by more than --epsilon / --temperature: "
                "try 0.025 / 0.2, a lower --lr, or a longer --freeze-prototypes-epochs")
        # The processes' queues differ: all gathered (a collective) into rank 0's one checkpoint.
        queues = None if queue is None else all_gather_cat(queue.embeddings[None]).cpu()
        if rank == 0:
            save_checkpoint(dict(method="swav", config=vars(config), epoch=epoch + 1,
                                 num_images=len(dataset), history=history, model=model.state_dict(),
                                 optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                                 queue=queues), checkpoint_path)
            write_log(os.path.join(output_dir, "log.jsonl"), history)

    if config.export and rank == 0:
        backbones.export_backbone(model.state_dict(), config.export, config.arch)
    barrier()
    return dict(model=model, queue=queue, history=history)


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
