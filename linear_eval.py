"""Evaluate a pre-trained backbone (spec §4): the paper's linear probe, weighted kNN, a fast probe on
cached features, and semi-supervised fine-tuning. Reads checkpoints of dino.py / moco_v2.py /
swav.py or an exported backbone.

    # linear probe, the paper's protocol (CNN §4.1: LARS, 100 epochs; ViT §4.2: last 4 CLS, SGD)
    python linear_eval.py --arch resnet18 --checkpoint runs/dino-resnet18/checkpoint.pth --data /imagenet
    torchrun --nproc_per_node 8 linear_eval.py --arch resnet18 --checkpoint ... --batch-size 512
    # weighted kNN (k 20, T 0.07) and the fast cached-feature probe: minutes instead of days
    python linear_eval.py --mode knn --arch resnet18 --checkpoint ... --data /imagenette --global-size 112
    python linear_eval.py --mode fast-linear --arch resnet18 --checkpoint ... --data cifar10 --global-size 32
    # semi-supervised fine-tuning on 1% of the labels (§4.3), or on a subset file
    python linear_eval.py --mode finetune --label-fraction 0.01 --arch resnet18 --checkpoint ...
    # sanity baseline: a random-init backbone on the built-in synthetic data
    python linear_eval.py --mode knn --arch resnet18 --checkpoint none --data synthetic --global-size 32

The pre-training scripts import the kNN monitor: `knn_monitor(backbone, eval_data, global_size, device)`.
"""
import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import backbones
import training
import views

PROTOCOLS = {
    "linear": "paper (spec §4.1 CNN: LARS lr 0.05/256; §4.2 ViT: last-4 CLS, SGD lr 0.01/256)",
    "fast-linear": "NOT the paper's protocol: linear layer on cached centre-crop features (no augmentation), Adam",
    "knn": "weighted kNN, train bank -> val (the paper's monitor ran val-vs-val leave-one-out, spec §4.4)",
    "finetune": "paper (spec §4.3: semi-supervised fine-tuning, SGD Nesterov lr 0.03/256)",
}

# ==============================================================================================
# Checkpoints: where each pre-training script keeps its backbone (the contract with dino.py,
# moco_v2.py, swav.py); checkpoint[key] is a state dict with "backbone.*" keys.
# ==============================================================================================

MODEL_KEYS = {"dino": None, "moco": "query_encoder", "swav": "model"}  # dino: --checkpoint-key


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the requested --arch."""


def _clean(key):
    return ".".join(part for part in key.split(".") if part != "module")  # DDP adds "module."


def read_checkpoint(path, checkpoint_key="teacher"):
    """-> (backbone state dict, info): info has the method, the arch it was pre-trained with and,
    for DINO, the projection head's state dict (fine-tuning starts from it, spec §4.3)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {error}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict or a state_dict, got {type(checkpoint).__name__}")
    if "method" not in checkpoint:  # an exported backbone: the backbone's own keys
        return {_clean(k): v for k, v in checkpoint.items()}, dict(method="exported", arch=None, head=None, key=None)
    method = checkpoint["method"]
    if method not in MODEL_KEYS:
        raise CheckpointError(f"{path}: unknown method {method!r}; expected dino, moco or swav")
    key = checkpoint_key if method == "dino" else MODEL_KEYS[method]
    if key not in checkpoint:
        raise CheckpointError(f"{path}: {method} checkpoint without {key!r} (keys: {', '.join(map(str, checkpoint))})")
    model = {_clean(k): v for k, v in checkpoint[key].items()}
    state = training.strip_prefix(model, "backbone.")
    if not state:
        raise CheckpointError(f"{path}: checkpoint[{key!r}] has no 'backbone.*' keys")
    head = training.strip_prefix(model, "head.") if method == "dino" else None
    arch = (checkpoint.get("settings") or {}).get("arch")
    return state, dict(method=method, arch=arch, head=head, key=key)


def build_for(arch, state):
    """build_backbone(arch), for a ViT with the patch size and position grid of `state` (a ViT
    pre-trained on 112 px crops has a 7x7 grid; a 224 px one 14x14)."""
    if arch in backbones.VIT_CONFIGS and "pos_embed" in state and "patch_embed.proj.weight" in state:
        patch = state["patch_embed.proj.weight"].shape[-1]
        return backbones.build_backbone(arch, patch_size=patch, img_size=patch * math.isqrt(state["pos_embed"].shape[1] - 1))
    return backbones.build_backbone(arch)


def mismatch(model, state):
    """Missing, unexpected and wrong-shape keys of `state` against `model`."""
    expected = model.state_dict()
    shape = lambda t: tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
    return ([k for k in expected if k not in state], [k for k in state if k not in expected],
            [f"{k} {shape(state[k])} vs {shape(v)}" for k, v in expected.items() if k in state and shape(state[k]) != shape(v)])


def fitting_archs(state, exclude=None):
    """The archs whose backbone `state` fits (CNNs built on the meta device: shapes only, no memory)."""
    fits = []
    for arch in backbones.ARCHS:
        if arch != exclude and (arch in backbones.VIT_CONFIGS) == ("pos_embed" in state):
            with torch.device("meta" if arch in backbones.CNN_FEAT_DIMS else "cpu"):
                if not any(mismatch(build_for(arch, state), state)):
                    fits.append(arch)
    return fits


def load_backbone(path, arch, checkpoint_key="teacher"):
    """Backbone `arch` with the weights at `path` ('none': random init) -> (backbone, info).
    Strict: every key must be there with its shape, or a CheckpointError names what does not fit."""
    if path in (None, "none"):
        return backbones.build_backbone(arch), dict(method="random-init", arch=arch, head=None, key=None)
    if not os.path.isfile(path):
        raise CheckpointError(f"--checkpoint {path!r}: no such file")
    state, info = read_checkpoint(path, checkpoint_key)
    # a full torchvision state dict (e.g. ImageNet weights) still has its classifier: not backbone
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    backbone = build_for(arch, state)
    missing, unexpected, shapes = mismatch(backbone, state)
    if missing or unexpected or shapes:
        few = lambda keys: ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        problems = [f"{name} {few(keys)}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        if info["arch"] and info["arch"] != arch:
            hint = f" It was pre-trained with --arch {info['arch']}: pass --arch {info['arch']}."
        else:  # an exported backbone has no settings: try every arch
            fits = fitting_archs(state, exclude=arch)
            hint = f" It fits --arch {' / '.join(fits)}." if fits else ""
        raise CheckpointError(f"{path} ({info['method']}) does not fit --arch {arch}: {'; '.join(problems)}.{hint}")
    backbone.load_state_dict(state, strict=True)
    return backbone, info


# ==============================================================================================
# Features and kNN (importable: the pre-training scripts run knn_monitor after each epoch)
# ==============================================================================================

def probe_features(backbone, n_last_blocks=4):
    """-> (images -> features, dim). CNN: the global-average-pooled output (§4.1); ViT: the CLS
    tokens of the last n blocks, each through the final norm, concatenated (§4.2: 4 x 192 = 768)."""
    if getattr(backbone, "is_vit", False):
        return (lambda x: backbone.last_cls_tokens(x, n_last_blocks)), backbone.feat_dim * n_last_blocks
    return backbone, backbone.feat_dim


@torch.no_grad()
def extract_features(backbone, loader, device, feature_fn=None, desc=None):
    """-> (features [N, D] float32 on CPU, labels [N] long). The backbone runs in eval() (BN uses its
    running statistics) and gets its previous train/eval mode back afterwards."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for images, targets in tqdm(loader, desc=desc, disable=desc is None, leave=False):
            features.append((feature_fn or backbone)(images.to(device, non_blocking=True)).float().cpu())
            labels.append(torch.as_tensor(targets).long())
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, num_classes, k=20,
                 temperature=0.07, chunk_size=512):
    """Weighted kNN (DINO's eval_knn): cosine similarity to the train bank; the k most similar bank
    images vote for their class with weight exp(sim / T). -> (top-1 %, top-5 %). Runs on the bank's
    device, `chunk_size` test images at a time (10k x 50k similarities never exist at once)."""
    device = train_features.device
    train_labels = train_labels.to(device)
    keep = train_labels >= 0  # unlabelled bank images (label -1, e.g. STL-10 unlabeled) cannot vote
    bank, bank_labels = F.normalize(train_features[keep].float(), dim=1), train_labels[keep]
    k, top = min(k, len(bank)), min(5, num_classes)  # top-5 is top-C when there are C < 5 classes
    hits = torch.zeros(2, dtype=torch.long, device=device)
    for start in range(0, len(test_features), chunk_size):
        queries = F.normalize(test_features[start:start + chunk_size].to(device).float(), dim=1)
        targets = test_labels[start:start + chunk_size].to(device)
        sims, index = (queries @ bank.T).topk(k, dim=1)
        # exp((sim - 1) / T) = exp(sim / T) / exp(1 / T): the same ranking, and no overflow for small T
        votes = torch.zeros(len(queries), num_classes, device=device)
        votes.scatter_add_(1, bank_labels[index], ((sims - 1) / temperature).exp())
        hit = votes.topk(top, dim=1).indices == targets[:, None]
        hits += torch.stack([hit[:, 0].sum(), hit.any(1).sum()])
    return tuple(100.0 * h / len(test_features) for h in hits.tolist())


def num_classes_of(dataset, labels=None):
    return max(len(getattr(dataset, "classes", ())), int(labels.max()) + 1 if labels is not None else 0)


_EVAL_SETS = {}  # (eval_data, global_size) -> (bank, val): the folders are scanned once per run


def knn_monitor(backbone, eval_data, global_size, run, batch_size=256, workers=0, amp="off", k=20, temperature=0.07):
    """kNN top-1/top-5 of an unwrapped `backbone` on centre crops, train bank -> val. Called by every
    rank: each extracts the features of its shard of the images, all-gathered, so no rank idles
    into the NCCL timeout while one process reads the whole data set. Every rank gets the result."""
    key = (eval_data, global_size)
    if key not in _EVAL_SETS:
        _EVAL_SETS[key] = training.build_eval_datasets(eval_data, views.eval_transform(global_size))
    bank_set, val_set = _EVAL_SETS[key]
    options = argparse.Namespace(batch_size=batch_size, workers=workers, amp=amp)
    bank, bank_labels = extract_all(backbone, bank_set, None, options, run, None)
    val, val_labels = extract_all(backbone, val_set, None, options, run, None)
    top1, top5 = knn_classify(bank.to(run.device), bank_labels, val, val_labels,
                              num_classes_of(bank_set, bank_labels), k, temperature)
    return dict(knn_top1=top1, knn_top5=top5)


# ==============================================================================================
# Linear probe, fine-tuning, and the loop they share
# ==============================================================================================

def new_linear(dim, num_classes, generator=None):
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01, generator=generator)  # spec §4.1: N(0, 0.01), bias 0
    nn.init.zeros_(linear.bias)
    return linear


def probe_optimizer(linear, is_vit, lr):
    """CNN: LARS, trust ratio on the weight only (the bias group is lars_exclude), no weight decay
    (§4.1). ViT: SGD momentum 0.9, no weight decay (§4.2)."""
    if is_vit:
        return torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    groups = [dict(params=[linear.weight]), dict(params=[linear.bias], lars_exclude=True)]
    return training.LARS(groups, lr=lr, weight_decay=0.0, momentum=0.9)


def count_hits(logits, labels):
    """[top-1 hits, top-5 hits] of a batch (top-C when there are C < 5 classes)."""
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(1).sum()])


@torch.no_grad()
def evaluate(predict, loader, run, amp="off"):
    """Top-1/top-5 % over a loader of this rank's disjoint shard, summed over ranks."""
    counts = torch.zeros(3, dtype=torch.float64, device=run.device)
    for images, labels in loader:
        labels = labels.to(run.device, non_blocking=True)
        with training.autocast(run, amp):
            logits = predict(images.to(run.device, non_blocking=True))
        counts[:2] += count_hits(logits.float(), labels)
        counts[2] += len(labels)
    training.all_reduce_sum(counts)
    return (100.0 * counts[:2] / counts[2].clamp(min=1)).tolist()


def train_and_evaluate(model, optimizer, train_loader, val_loader, predict, epochs, lr, run, amp="off",
                       inputs=None, report=None, min_lr=1e-6):
    """The loop of the probe and of fine-tuning: cosine lr to min_lr set once per epoch (the paper's
    classification code sets it before each epoch, §4.1), validation after every epoch.
    inputs: images -> what `model` trains on, computed without gradient (the frozen features)."""
    scaler = training.grad_scaler(run, amp)
    lrs = training.cosine_schedule(lr, min_lr, epochs, 1)
    history = []
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = lrs[epoch]
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum, steps = torch.zeros((), device=run.device), 0
        for images, labels in tqdm(train_loader, desc=f"epoch {epoch}", disable=not run.main, leave=False):
            images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
            if inputs is not None:
                with torch.no_grad(), training.autocast(run, amp):
                    images = inputs(images)
            loss_sum += train_step(model, optimizer, images, labels, run, amp, scaler)
            steps += 1
        model.eval()
        top1, top5 = evaluate(predict, val_loader, run, amp)
        history.append(dict(epoch=epoch, lr=lrs[epoch], loss=loss_sum.item() / max(steps, 1), top1=top1, top5=top5))
        if report:
            report(history)
    return history


def train_step(model, optimizer, inputs, labels, run, amp="off", scaler=None):
    with training.autocast(run, amp):
        loss = F.cross_entropy(model(inputs).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler = scaler or training.grad_scaler(run, amp)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def wrap_ddp(module, run):
    if not training.distributed():
        return module
    return DistributedDataParallel(module, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def train_linear_probe(backbone, train_loader, val_loader, num_classes, epochs, lr, run, amp="off",
                       n_last_blocks=4, report=None):
    """The paper's probe: a Linear on the features of a frozen backbone kept in eval() for the whole
    run, so BN uses the pre-training running statistics (§4.1). -> (linear, history)."""
    backbone.eval().requires_grad_(False)
    features, dim = probe_features(backbone, n_last_blocks)
    linear = new_linear(dim, num_classes).to(run.device)
    optimizer = probe_optimizer(linear, backbone.is_vit, lr)
    history = train_and_evaluate(wrap_ddp(linear, run), optimizer, train_loader, val_loader,
                                 lambda images: linear(features(images)), epochs, lr, run, amp,
                                 inputs=features, report=report)
    return linear, history


class FineTuneNet(nn.Module):
    """Backbone + MLP head Linear(d, 2048)-BN-GELU-Linear(2048, 2048)-BN-GELU-Linear(2048, C) (§4.3).
    head.0/1/3/4 are laid out like DINO's CNN head.mlp.0/1/3/4, so they can start from it."""

    def __init__(self, backbone, num_classes, hidden=2048):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(backbone.feat_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                  nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, images):
        return self.head(self.backbone(images))


def init_head_from_dino(model, dino_head):
    """Copy DINO's head.mlp.0/1/3/4 (the first two Linear+BN pairs) into model.head -> what was done."""
    target = model.head.state_dict()
    wanted = [k for k in target if k.split(".")[0] in ("0", "1", "3", "4")]
    source = {k[len("mlp."):]: v for k, v in (dino_head or {}).items() if k.startswith("mlp.")}
    if not dino_head:
        return "head: random init (the checkpoint has no DINO projection head)"
    if any(k not in source or source[k].shape != target[k].shape for k in wanted):
        return "head: random init (the DINO head is not Linear-BN-GELU-Linear-BN of matching sizes, e.g. a ViT head)"
    model.head.load_state_dict({k: source[k] for k in wanted}, strict=False)
    return "head: Linear+BN pairs 0/1/3/4 copied from the DINO projection head; last Linear new"


def finetune_optimizer(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)  # §4.3


def finetune(model, train_loader, val_loader, epochs, lr, run, amp="off", report=None):
    """The whole network in train mode (§4.3); SyncBN across GPUs as the paper's code."""
    if training.distributed() and run.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(run.device)
    model.requires_grad_(True)
    optimizer = finetune_optimizer(model, lr)
    return train_and_evaluate(wrap_ddp(model, run), optimizer, train_loader, val_loader, model, epochs, lr, run, amp,
                              report=report)


@torch.enable_grad()  # callers may hold cached features under no_grad
def fit_linear(features, labels, num_classes, epochs=100, lr=1e-3, batch_size=1024, seed=0, device="cpu"):
    """Fast mode only, NOT the paper's protocol: a Linear trained on cached features with Adam
    (no weight decay, cosine per step to 0, shuffled mini-batches of the cached tensor). Adam because
    cached features of different backbones differ in scale by orders of magnitude, and Adam's
    per-weight step makes one default lr work for all: no lr sweep in a mode meant to take seconds."""
    generator = torch.Generator().manual_seed(seed)
    linear = new_linear(features.shape[1], num_classes, generator).to(device)
    features, labels = features.to(device), labels.to(device)
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    lrs = training.cosine_schedule(lr, 0.0, epochs, steps_per_epoch)
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(device)
        for i in range(steps_per_epoch):
            optimizer.param_groups[0]["lr"] = lrs[epoch * steps_per_epoch + i]
            index = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(linear(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return linear


# ==============================================================================================
# Label subsets for fine-tuning (§4.3)
# ==============================================================================================

def balanced_subset(labels, fraction, seed=0):
    """Sorted indices of `fraction` of each class (at least 1 per class), drawn with a seeded
    generator: the same subset on every rank and every run."""
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique().tolist():
        if c < 0:
            continue  # unlabelled
        index = (labels == c).nonzero().flatten()
        count = max(1, round(fraction * len(index)))
        chosen.append(index[torch.randperm(len(index), generator=generator)[:count]])
    return torch.cat(chosen).sort().values.tolist()


def subset_from_file(paths, subset_file):
    """Indices of `paths` whose file name is listed in `subset_file`: one name per line, or the
    spec's "index,label,wnid,filename" lines (the last comma field; indices are not portable)."""
    with open(subset_file) as f:
        names = {os.path.basename(line.strip().split(",")[-1].strip()) for line in f if line.strip()}
    return [i for i, path in enumerate(paths) if os.path.basename(path) in names], len(names)


def dataset_labels(dataset):
    for attribute in ("targets", "labels"):  # torchvision CIFAR / STL-10
        if hasattr(dataset, attribute):
            return torch.as_tensor(getattr(dataset, attribute))
    if hasattr(dataset, "samples"):  # ImageFiles
        return torch.tensor([label for _, label in dataset.samples])
    return torch.tensor([dataset[i][1] for i in range(len(dataset))])  # synthetic: renders every image once


# ==============================================================================================
# Data and the command line
# ==============================================================================================

def build_datasets(data, global_size, train_augment=True):
    """-> (train, val). Train: RandomResizedCrop(bicubic) + flip (§4.1), or centre crops for the
    cached-feature modes; val: Resize(256/224 * size) + CenterCrop(size), bicubic."""
    val_tf = views.eval_transform(global_size)
    train_tf = T.Compose([T.RandomResizedCrop(global_size, interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(views.IMAGENET_MEAN, views.IMAGENET_STD)]) if train_augment else val_tf
    return training.build_eval_datasets(data, val_tf, train_tf)


def train_loader_for(dataset, args, run):
    sampler = DistributedSampler(dataset, num_replicas=run.world, rank=run.rank, shuffle=True, seed=args.seed)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                      pin_memory=run.device.type == "cuda", drop_last=len(sampler) > args.batch_size,
                      persistent_workers=args.workers > 0)


def shard_loader_for(dataset, args, run):
    """This rank's images rank, rank + world, ...: disjoint shards, so every image is counted
    exactly once (a DistributedSampler would pad with repeats)."""
    shard = Subset(dataset, range(run.rank, len(dataset), run.world))
    return DataLoader(shard, batch_size=args.batch_size, num_workers=args.workers, pin_memory=run.device.type == "cuda")


def extract_all(backbone, dataset, feature_fn, args, run, desc):
    """Features of the whole dataset, in dataset order, on every rank (strided shards + all-gather)."""
    with training.autocast(run, args.amp):
        features, labels = extract_features(backbone, shard_loader_for(dataset, args, run), run.device,
                                            feature_fn, desc if run.main else None)
    if run.world == 1:
        return features, labels
    n, per = len(dataset), math.ceil(len(dataset) / run.world)

    def gather(t):  # pad every shard to `per`, gather, then interleave: row j of rank r is image j * world + r
        t = torch.cat([t, t.new_zeros((per - len(t),) + t.shape[1:])]).to(run.device)
        return training.concat_all_gather(t).view(run.world, per, *t.shape[1:]).transpose(0, 1).flatten(0, 1)[:n].cpu()
    return gather(features), gather(labels)


def get_args_parser():
    p = argparse.ArgumentParser(description="Linear probe / kNN / fine-tuning of a pre-trained backbone (spec §4).")
    p.add_argument("--mode", default="linear", choices=["linear", "fast-linear", "knn", "finetune"],
                   help="linear: the paper's probe (§4.1/4.2); fast-linear: Adam on cached features, seconds, "
                        "NOT the paper's protocol; knn: weighted kNN; finetune: semi-supervised (§4.3)")
    p.add_argument("--arch", default="resnet18", help=f"one of {', '.join(backbones.ARCHS)}; must match the checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pth of dino.py / moco_v2.py / swav.py, an exported backbone, or 'none' (random init)")
    p.add_argument("--checkpoint-key", default="teacher", choices=["teacher", "student"],
                   help="DINO network to evaluate: teacher (official DINO); the SSLight code took the student (§4)")
    p.add_argument("--data", default="synthetic", help="ImageFolder root with train/ and val/, cifar10 | cifar100 | stl10, or synthetic")
    p.add_argument("--global-size", type=int, default=224, help="crop size: paper 224; e.g. 112 for Imagenette-112, 32 for CIFAR")
    p.add_argument("--epochs", type=int, default=None,
                   help="linear / fast-linear 100; finetune 60 for 1%% labels, 30 for 10%% (§4.3: 60 below 5%%, else 30)")
    p.add_argument("--batch-size", type=int, default=128, help="per process; paper: linear CNN 512 x 8 = 4096, ViT 128 x 8, finetune 128 x 8")
    p.add_argument("--lr", type=float, default=None,
                   help="per 256 images (scaled by the global batch): linear CNN 0.05 (LARS, 0.8 at 4096), ViT 0.01 (SGD), "
                        "finetune 0.03 (0.12 at 1024); fast-linear: Adam lr, 1e-3, not scaled")
    p.add_argument("--n-last-blocks", type=int, default=4, help="ViT probe: CLS tokens of the last n blocks (paper 4)")
    p.add_argument("--knn-k", type=int, default=20, help="DINO 20; the MoCo / InstDisc monitor uses 200")
    p.add_argument("--knn-t", type=float, default=0.07, help="vote weight exp(sim / T): DINO 0.07; MoCo monitor 0.1")
    p.add_argument("--label-fraction", type=float, default=None, help="finetune: fraction of each class's labels (default 0.01)")
    p.add_argument("--subset-file", default=None, help="finetune: file names to keep, one per line (or index,label,wnid,filename)")
    p.add_argument("--output-dir", default=None, help="default runs/eval-<mode>-<arch>")
    p.add_argument("--output", default=None, help="results JSON, default <output-dir>/linear_eval.json")
    p.add_argument("--workers", type=int, default=8, help="data-loader processes per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"], help="autocast on CUDA (the paper: fp32); ignored on CPU")
    return p


def main(args):
    run = training.setup_run(args)
    log = print if run.main else (lambda *a, **k: None)
    args.output_dir = args.output_dir or os.path.join("runs", f"eval-{args.mode}-{args.arch}")
    output = args.output or os.path.join(args.output_dir, "linear_eval.json")
    try:
        backbone, info = load_backbone(args.checkpoint, args.arch, args.checkpoint_key)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    backbone.to(run.device)
    result = dict(mode=args.mode, protocol=PROTOCOLS[args.mode], arch=args.arch, checkpoint=args.checkpoint,
                  method=info["method"], checkpoint_key=info["key"], data=args.data, global_size=args.global_size,
                  world_size=run.world, amp=args.amp if run.device.type == "cuda" else "off")
    tag = "[fast-linear: NOT the paper's protocol] " if args.mode == "fast-linear" else ""
    log(f"{tag}{args.mode} | {args.arch} from {args.checkpoint} ({info['method']}"
        f"{', ' + info['key'] if info['key'] else ''}) | {args.data} at {args.global_size}px | {run.world} process(es) on {run.device}")

    def write(extra):
        result.update(extra)
        if run.main:
            os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
            with open(output, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2, ensure_ascii=False)

    def report(history):  # after every epoch: print and rewrite the JSON, so a killed run keeps its numbers
        best = max(history, key=lambda h: h["top1"])
        h = history[-1]
        log(f"{tag}epoch {h['epoch']}: loss {h['loss']:.4f} lr {h['lr']:.4g} top-1 {h['top1']:.2f} top-5 {h['top5']:.2f} "
            f"(best top-1 {best['top1']:.2f} at epoch {best['epoch']})")
        write(dict(history=history, final_top1=h["top1"], final_top5=h["top5"], best_top1=best["top1"],
                   best_top5=best["top5"], best_epoch=best["epoch"]))

    global_batch = args.batch_size * run.world
    if args.mode in ("knn", "fast-linear"):
        feature_fn, _ = probe_features(backbone, args.n_last_blocks) if args.mode == "fast-linear" else (backbone, None)
        bank_set, val_set = build_datasets(args.data, args.global_size, train_augment=False)
        bank, bank_labels = extract_all(backbone, bank_set, feature_fn, args, run, "train features")
        val, val_labels = extract_all(backbone, val_set, feature_fn, args, run, "val features")
        classes = num_classes_of(bank_set, bank_labels)
        if args.mode == "knn":
            top1, top5 = knn_classify(bank.to(run.device), bank_labels, val, val_labels, classes, args.knn_k, args.knn_t)
            extra = dict(k=args.knn_k, temperature=args.knn_t)
        else:
            epochs, lr = args.epochs or 100, args.lr or 1e-3
            keep = bank_labels >= 0
            linear = fit_linear(bank[keep], bank_labels[keep], classes, epochs, lr, seed=args.seed, device=run.device)
            with torch.no_grad():
                top1, top5 = [100.0 * h / len(val) for h in count_hits(linear(val.to(run.device)), val_labels.to(run.device)).tolist()]
            extra = dict(epochs=epochs, lr=lr, optimizer="adam", batch_size=1024)
        log(f"{tag}{args.mode}: top-1 {top1:.2f} top-5 {top5:.2f} ({len(bank)} train / {len(val)} val images)")
        write(dict(extra, final_top1=top1, final_top5=top5, best_top1=top1, best_top5=top5))
    elif args.mode == "linear":
        train_set, val_set = build_datasets(args.data, args.global_size)
        epochs = args.epochs or 100
        lr = (args.lr or (0.01 if backbone.is_vit else 0.05)) * global_batch / 256
        write(dict(epochs=epochs, lr=lr, global_batch=global_batch, optimizer="sgd" if backbone.is_vit else "lars"))
        train_linear_probe(backbone, train_loader_for(train_set, args, run), shard_loader_for(val_set, args, run),
                           num_classes_of(train_set), epochs, lr, run, args.amp, args.n_last_blocks, report)
    else:  # finetune
        train_set, val_set = build_datasets(args.data, args.global_size)
        if args.subset_file:
            if not hasattr(train_set, "samples"):
                raise SystemExit("--subset-file needs --data to be an image folder (file names to match)")
            indices, listed = subset_from_file([path for path, _ in train_set.samples], args.subset_file)
            log(f"{args.subset_file}: {listed} names listed, {len(indices)} matched in {args.data}/train")
            if not indices:
                raise SystemExit(f"no file of {args.data}/train is named in {args.subset_file}")
        else:
            indices = balanced_subset(dataset_labels(train_set), args.label_fraction or 0.01, args.seed)
        fraction = len(indices) / len(train_set)
        epochs = args.epochs or (60 if fraction < 0.05 else 30)
        lr = (args.lr or 0.03) * global_batch / 256
        model = FineTuneNet(backbone, num_classes_of(train_set))
        head_note = init_head_from_dino(model, info["head"])
        log(f"{len(indices)} labelled images ({100 * fraction:.2f}%), {epochs} epochs, lr {lr:.4g}; {head_note}")
        write(dict(epochs=epochs, lr=lr, global_batch=global_batch, labelled_images=len(indices),
                   label_fraction=fraction, head_init=head_note))
        finetune(model, train_loader_for(Subset(train_set, indices), args, run), shard_loader_for(val_set, args, run),
                 epochs, lr, run, args.amp, report)
    if "final_top1" in result:
        log(f"{tag}final top-1 {result['final_top1']:.2f} top-5 {result['final_top5']:.2f}; "
            f"best top-1 {result['best_top1']:.2f}; results in {output}")
    training.cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
