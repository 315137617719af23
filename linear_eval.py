"""Evaluate a pre-trained backbone (SSLight, Tan, Saleh, Martinez, ICLR 2023): the paper's linear
probe, weighted kNN, a fast probe on cached features, and semi-supervised fine-tuning.

    python linear_eval.py --checkpoint runs/dino-resnet18/checkpoint.pth --data /path/imagenet
    torchrun --nproc_per_node=8 linear_eval.py --checkpoint ... --data /path/imagenet
    python linear_eval.py --mode knn --checkpoint none --data cifar10 --global-size 32

--checkpoint: a checkpoint.pth of dino.py (the teacher by default), moco_v2.py or swav.py, a
backbone from their --export, or the weights of official DINO, MoCo, SwAV or SSLight (their
layouts: backbones.LAYOUTS). Results: eval-<mode>.json beside it, rewritten after every epoch.
"""
import argparse
import collections
import json
import math
import os
import sys
import types

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import backbones
import views
from views import UserError

PROTOCOLS = {  # written into the results
    "linear": "the paper's probe (SSLight's *_linear.yaml): a Linear on the frozen backbone",
    "fast-linear": "NOT the paper's protocol: a Linear on cached centre-crop features, Adam",
    "knn": "weighted kNN, train bank -> val (official DINO eval_knn.py)",
    "finetune": "the paper's semi-supervised fine-tuning (SSLight's dino_*_semi.yaml)",
}


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Linear probe / kNN / fine-tuning of a pre-trained backbone",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e = parser.add_argument_group("what to evaluate")
    e.add_argument("--mode", default="linear", choices=list(PROTOCOLS),
                   help="linear: the paper's probe; fast-linear: NOT the paper's, seconds")
    e.add_argument("--checkpoint", required=True,
                   help="checkpoint.pth, an --export, DINO/MoCo/SwAV/SSLight weights, or none")
    e.add_argument("--checkpoint-key", default="teacher", choices=["teacher", "student"],
                   help="DINO: teacher (official DINO); SSLight's code took the student")
    e.add_argument("--arch", default=None, choices=backbones.ARCHS, help="None: the checkpoint's")
    e.add_argument("--data", default="synthetic", help="train/ + val/ folders, cifar10, stl10, ...")
    e.add_argument("--global-size", type=int, default=224, help="crop size: paper 224, CIFAR 32")
    e.add_argument("--output", default=None, help="results JSON; default beside the checkpoint")
    r = parser.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=128,
                   help="per process; paper: linear CNN 512 x 8 GPUs, ViT and finetune 128 x 8")
    r.add_argument("--workers", type=int, default=None, help="None: cores / processes, at most 8")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="auto: bf16, fp16 below compute capability 8.0, off on CPUs; paper fp32")
    p = parser.add_argument_group("protocol (None = the paper's value for the mode and arch)")
    p.add_argument("--epochs", type=int, default=None, help="100; finetune 60 at 1%%, 30 at 10%%")
    p.add_argument("--lr", type=float, default=None,
                   help="per 256 images: probe CNN 0.05, ViT 0.01; finetune 0.03; fast-linear 1e-3")
    p.add_argument("--n-last-blocks", type=int, default=4, help="ViT probe: last n CLS (paper 4)")
    p.add_argument("--knn-k", type=int, default=20, help="official DINO 20; MoCo's monitor 200")
    p.add_argument("--knn-t", type=float, default=0.07, help="DINO 0.07; MoCo's monitor 0.1")
    p.add_argument("--label-fraction", type=float, default=None, help="finetune: paper 0.01, 0.1")
    p.add_argument("--subset-file", default=None, help="finetune: the file names to keep")
    return parser


def default_output(checkpoint, arch, mode, key="teacher", label_fraction=None, subset_file=None):
    """DIR/checkpoint.pth -> DIR/eval-knn.json, DIR/r18.pth -> DIR/r18.eval-knn.json, and so on."""
    name = f"eval-{mode}"
    if mode == "finetune":
        name += "-" + (os.path.splitext(os.path.basename(subset_file))[0] if subset_file
                       else f"{100 * (label_fraction or 0.01):g}pct")
    if checkpoint == "none":
        return os.path.join("runs", f"eval-random-{arch}", f"{name}.json")
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    name += "-student" if key == "student" else ""
    prefix = "" if stem == "checkpoint" else stem + "."
    return os.path.join(os.path.dirname(checkpoint), f"{prefix}{name}.json")


def resolve_config(args, pretrained_arch=None):
    """The whole configuration, once: the flags + the paper's values for the mode and arch. Every
    numeric flag is checked here, before any process, data or output: one line, nothing written."""
    config = dict(vars(args))
    arch = config["arch"] = args.arch or pretrained_arch or "resnet18"
    vit = backbones.is_vit(arch)
    # (epochs, lr per 256 images; fast-linear: Adam's own). Fine-tuning's epochs follow its subset.
    epochs, lr = {"linear": (100, 0.01 if vit else 0.05), "fast-linear": (100, 1e-3),
                  "knn": (None, None), "finetune": (None, 0.03)}[args.mode]
    config["epochs"] = args.epochs if args.epochs is not None else epochs
    config["lr"] = args.lr if args.lr is not None else lr
    config["output"] = args.output or default_output(args.checkpoint, arch, args.mode,
                                                     args.checkpoint_key, args.label_fraction,
                                                     args.subset_file)
    depth = backbones.VIT_CONFIGS[arch][1] if vit else None  # --n-last-blocks: at most all
    limits = dict(batch_size=(1, None), epochs=(1, None), knn_k=(1, None), workers=(0, None),
                  global_size=(16, None), n_last_blocks=(1, depth), lr=(0, None), knn_t=(0, None),
                  label_fraction=(0, 1), seed=(0, 2 ** 63 - 1))  # seed: what torch takes
    for name, (low, high) in limits.items():  # floats: finite and > low; integers: >= low
        value, real = config[name], isinstance(config[name], float)
        if value is not None and not (math.isfinite(value) and value <= (high or value)
                                      and (low < value or value == low and not real)):
            kind = f"a finite number > {low}" if real else f"an integer >= {low}"
            raise UserError(f"--{name.replace('_', '-')} must be {kind}"
                            f"{f' and <= {high}' if high else ''}, not {value}")
    if args.subset_file and not os.path.isfile(args.subset_file):
        raise UserError(f"--subset-file {args.subset_file}: no such file")
    if vit and args.global_size % backbones.PATCH_SIZE:
        raise UserError(f"--global-size {args.global_size}: a ViT needs a multiple of 16")
    config["workers"] = loader_workers(args.workers)
    return types.SimpleNamespace(**config)


def read_checkpoint(path, checkpoint_key="teacher"):
    """-> (backbone state dict, info: path, method, arch, network's key, DINO's projection head)."""
    info = dict(path=path, method="random-init", arch=None, key=None, head=None)
    if path == "none":
        return None, info
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path}: no such file (or none for a random-init backbone)")
    try:
        checkpoint = backbones.load_checkpoint(path)
    except Exception as error:
        raise UserError(f"--checkpoint {path}: cannot read it: {str(error)[:200]}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"--checkpoint {path}: not a checkpoint but a {type(checkpoint).__name__}")
    try:  # the scripts' checkpoints and --export, official DINO / MoCo / SwAV, SSLight
        state, found = backbones.read_backbone(checkpoint, checkpoint_key)
    except ValueError as error:
        raise UserError(f"--checkpoint {path}: {error}") from None
    fitting = [arch for arch in backbones.ARCHS if not found["arch"] and fits(arch, state)]
    found["arch"] = found["arch"] or (fitting[0] if len(fitting) == 1 else None)  # if unsaid
    return state, dict(info, **found)


def build_for(arch, state):
    """build_backbone(arch); a ViT with the patch size and position grid of `state` (112 px: 7x7)"""
    if backbones.is_vit(arch) and state and {"pos_embed", "patch_embed.proj.weight"} <= set(state):
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
        return backbones.build_backbone(arch, patch_size=patch, img_size=patch * grid)
    return backbones.build_backbone(arch)


def mismatch(model, state):
    expected = model.state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    return [k for k in expected if k not in state], [k for k in state if k not in expected], wrong


def fits(arch, state):
    """Whether `state` fits backbone `arch` (built on the meta device: shapes, no memory)."""
    with torch.device("meta"):
        return not any(mismatch(build_for(arch, state), state))


def backbone_from(state, info, arch):
    """Backbone `arch` with the weights `state` (None: random init), strictly, or one UserError."""
    backbone = build_for(arch, state)
    if state is None:
        return backbone
    problems = []
    for name, keys in zip(("missing", "unexpected", "wrong shape"), mismatch(backbone, state)):
        if keys:
            more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
            problems.append(f"{name} {', '.join(keys[:4])}{more}")
    if problems:
        if info["arch"] and info["arch"] != arch:  # the file's arch, or the one it fits
            hint = f" It holds a {info['arch']} backbone: pass --arch {info['arch']}."
        else:  # an exported backbone has no saved config: try every arch
            fitting = [other for other in backbones.ARCHS if other != arch and fits(other, state)]
            hint = (f" It fits --arch {' / '.join(fitting)}." if fitting else
                    f" It fits no arch here (layouts read: {'; '.join(backbones.LAYOUTS)}).")
        raise UserError(f"--checkpoint {info['path']} ({info['method']}) does not fit --arch "
                        f"{arch}: {'; '.join(problems)}.{hint}")
    backbone.load_state_dict(state, strict=True)
    return backbone


def probe_features(backbone, n_last_blocks=4):
    """-> (images -> features, dim). CNN: pooled output; ViT: last n normed CLS tokens (DINO's)."""
    if getattr(backbone, "is_vit", False):
        features = lambda images: backbone.last_cls_tokens(images, n_last_blocks)
        return features, backbone.feat_dim * n_last_blocks
    return backbone, backbone.feat_dim


def features_in_eval_mode(module, feature_fn, dataset, *options):
    """extract_features(feature_fn, dataset, *options) with `module` in eval mode, then back."""
    was_training = module.training
    module.eval()  # BN: its running statistics
    features = extract_features(feature_fn, dataset, *options)
    module.train(was_training)
    return features


@torch.no_grad()
def accuracy(classifier, features, labels, chunk=4096):
    """[top-1 %, top-5 %] of classifier(features) (top-C for C < 5 classes), rounded to 0.01."""
    hits = torch.zeros(2, device=features.device)
    for rows, targets in zip(features.split(chunk), labels.split(chunk)):
        logits = classifier(rows).float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        hits += torch.stack([hit[:, 0].sum(), hit.any(1).sum()])
    return [round(v, 2) for v in (100.0 * hits / max(1, len(labels))).tolist()]


def new_linear(dim, num_classes, generator=None):
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01, generator=generator)  # official DINO eval_linear.py
    nn.init.zeros_(linear.bias)
    return linear


def probe_optimizer(linear, is_vit, lr):
    """No weight decay. CNN: LARS, the bias without trust ratio (as SSLight's); ViT: SGD."""
    if is_vit:
        return torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    groups = [dict(params=[linear.weight]), dict(params=[linear.bias], lars_exclude=True)]
    return LARS(groups, lr=lr, momentum=0.9)


def train_loader_for(dataset, batch_size, workers, device, rank, world_size, seed):
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, seed=seed)
    # drop_last only with more than one batch: a last batch of 1 image breaks train-mode BatchNorm
    return torch.utils.data.DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        drop_last=len(sampler) > batch_size, persistent_workers=workers > 0)


def train_and_evaluate(model, optimizer, loader, epochs, lr, to_inputs, evaluate, device,
                       world_size, autocast, scaler, report, rank=0, min_lr=1e-6):
    lrs = cosine_schedule(lr, min_lr, epochs, 1)
    history = []
    # One step: to_inputs (probe: the frozen backbone's features under no_grad, so no graph; else
    # the normalised images), fp32 logits' cross-entropy under autocast, zero_grad, the scaled
    # backward, the scaler's step (skipped on inf gradients in fp16), then its update. The lr is set
    # once per epoch before its first step (SSLight's); the loss is read once per epoch: one sync.
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = lrs(epoch)
        loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        for images, labels in tqdm(loader, f"epoch {epoch + 1}/{epochs}", disable=rank != 0,
                                   leave=False):
            inputs, labels = to_inputs(images), labels.to(device, non_blocking=True)
            with autocast:
                loss = F.cross_entropy(model(inputs).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
        loss = (all_reduce_sum(loss_sum) / (len(loader) * world_size)).item()
        if not math.isfinite(loss):
            raise SystemExit(f"error: non-finite loss in epoch {epoch + 1}; try --amp off or a "
                             "lower --lr")
        history.append(dict(epoch=epoch + 1, lr=lrs(epoch), loss=loss, **evaluate()))
        report(history)
    return history


def train_linear_probe(backbone, loader, val_features, val_labels, num_classes, epochs, lr,
                       device, world_size, autocast, scaler, memory_format, n_last_blocks, report,
                       rank=0):
    """The paper's probe: a Linear on a backbone frozen in eval mode (BN: pre-training stats)."""
    backbone.eval().requires_grad_(False)
    features, dim = probe_features(backbone, n_last_blocks)
    linear = new_linear(dim, num_classes).to(device)
    optimizer = probe_optimizer(linear, getattr(backbone, "is_vit", False), lr)
    def frozen_features(images):
        with torch.no_grad(), autocast:
            return features(views.normalize(images, device, memory_format)).float()
    evaluate = lambda: dict(zip(("top1", "top5"), accuracy(linear, val_features, val_labels)))
    model = nn.parallel.DistributedDataParallel(linear) if world_size > 1 else linear
    return linear, train_and_evaluate(model, optimizer, loader, epochs, lr, frozen_features,
                                      evaluate, device, world_size, autocast, scaler, report, rank)


def finetune_net(backbone, num_classes, hidden=2048):
    """Backbone + MLP head (SSLight's dino_*_semi.yaml), laid out as DINO's CNN head.mlp."""
    head = nn.Sequential(nn.Linear(backbone.feat_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                         nn.Linear(hidden, num_classes))
    return nn.Sequential(collections.OrderedDict(backbone=backbone, head=head))


def init_head_from_dino(model, dino_head):
    """Copy DINO's head.mlp.0/1/3/4 (the first two Linear + BN pairs) into model.head -> a note."""
    if not dino_head:
        return "head: random init (the checkpoint has no DINO projection head)"
    target = model.head.state_dict()
    wanted = [k for k in target if k.split(".")[0] in ("0", "1", "3", "4")]
    source = {k[len("mlp."):]: v for k, v in dino_head.items() if k.startswith("mlp.")}
    if any(k not in source or source[k].shape != target[k].shape for k in wanted):
        return "head: random init (the DINO head is not Linear-BN-GELU-Linear-BN, e.g. a ViT's)"
    model.head.load_state_dict({k: source[k] for k in wanted}, strict=False)
    return "head: Linear + BN pairs 0/1/3/4 copied from the DINO projection head; last Linear new"


def finetune_optimizer(model, lr):  # the same for the head (SSLight's dino_*_semi.yaml)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)


@torch.enable_grad()  # callers may hold cached features under no_grad
def fit_linear(features, labels, num_classes, epochs=100, lr=1e-3, batch_size=1024, seed=0):
    """fast-linear: Adam, whose per-weight step suits features of any scale with one lr; seeded."""
    generator = torch.Generator().manual_seed(seed)
    linear = new_linear(features.shape[1], num_classes, generator).to(features.device)
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    lrs = cosine_schedule(lr, 0.0, epochs, steps_per_epoch)
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for i in range(steps_per_epoch):
            optimizer.param_groups[0]["lr"] = lrs(epoch * steps_per_epoch + i)
            index = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(linear(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return linear


def balanced_subset(labels, fraction, seed=0):
    """Sorted indices of `fraction` of each class (at least 1), seeded: the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels[labels >= 0].unique().tolist():  # -1: unlabelled
        index = (labels == c).nonzero().flatten()
        keep = max(1, round(fraction * len(index)))
        chosen.append(index[torch.randperm(len(index), generator=generator)[:keep]])
    return torch.cat(chosen).sort().values.tolist()


def subset_from_file(paths, subset_file):
    """-> (the `paths` named in `subset_file`, as indices; how many names it lists). A name a line,
    or SSLight's "index,label,wnid,filename" lines."""
    with open(subset_file) as f:
        names = {os.path.basename(line.split(",")[-1].strip()) for line in f if line.strip()}
    return [i for i, path in enumerate(paths) if os.path.basename(path) in names], len(names)


def dataset_labels(dataset):
    labels = getattr(dataset, "targets", getattr(dataset, "labels", None))  # CIFAR / STL-10
    if labels is not None:
        return torch.as_tensor(labels)
    if hasattr(dataset, "samples"):  # views.ImageFiles
        return torch.tensor([label for _, label in dataset.samples])
    return torch.tensor([dataset[i][1] for i in range(len(dataset))])  # synthetic: renders them


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
    args = get_args_parser().parse_args(argv)
    state, info = read_checkpoint(args.checkpoint, args.checkpoint_key)
    config = resolve_config(args, info["arch"])  # a user mistake ends here, before any process
    rank, world_size, device = init_distributed(config.device, config.seed)
    log = print if rank == 0 else (lambda *a, **k: None)
    config.amp, amp_note = resolve_amp(config.amp, device)
    backbone = backbone_from(state, info, config.arch)
    memory_format = backbones.memory_format(config.arch, device)  # channels_last for CNNs on CUDA
    backbone.to(device, memory_format=memory_format)
    half = torch.float16 if config.amp == "fp16" else torch.bfloat16
    autocast = torch.autocast(device.type, half, enabled=config.amp != "off")
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    tag = "[fast-linear: NOT the paper's protocol] " if config.mode == "fast-linear" else ""
    log(f"{tag}{config.mode} | {config.arch} from {config.checkpoint} ({info['method']}) | "
        f"{world_size} process(es) on {device}, amp {config.amp} {amp_note}| {config.output}")
    log("configuration:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(vars(config).items())))

    # ============ data: labelled train images (augmented to train on), centre-cropped val ======
    if rank != 0:
        barrier()  # rank 0 downloads a named data set first
    trains = config.mode in ("linear", "finetune")
    augment = views.probe_transform(config.global_size) if trains else None
    train_set, val_set = views.build_eval_datasets(
        config.data, views.eval_transform(config.global_size), augment, download=rank == 0)
    if rank == 0:
        barrier()
    num_classes = len(train_set.classes)
    options = (config.batch_size, config.workers, device, rank, world_size, autocast, memory_format)
    probe = probe_features(backbone, config.n_last_blocks)[0]
    global_batch = config.batch_size * world_size
    lr = config.lr * global_batch / 256 if trains else config.lr  # fast-linear: Adam's, not scaled
    result = dict(mode=config.mode, protocol=PROTOCOLS[config.mode], arch=config.arch,
                  checkpoint=config.checkpoint, method=info["method"], checkpoint_key=info["key"],
                  data=config.data, global_size=config.global_size, world_size=world_size,
                  amp=config.amp, train_images=len(train_set), val_images=len(val_set))

    def write(extra):  # replaced atomically: a killed run keeps its last finished epoch's results
        result.update(extra)
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
            with open(f"{config.output}.tmp", "w") as f:
                json.dump(result, f, indent=2)
            os.replace(f"{config.output}.tmp", config.output)

    def report(history):  # after every epoch: one line, and the JSON rewritten
        best, last = max(history, key=lambda h: h["top1"]), history[-1]
        log(f"epoch {last['epoch']}/{result['epochs']}: loss {last['loss']:.4f}, "
            f"lr {last['lr']:.4g}, top-1 {last['top1']:.2f} %, top-5 {last['top5']:.2f} % "
            f"(best {best['top1']:.2f} in epoch {best['epoch']})")
        write(dict(history=history, final_top1=last["top1"], final_top5=last["top5"],
                   best_top1=best["top1"], best_top5=best["top5"], best_epoch=best["epoch"]))

    classifier = None
    if not trains:  # knn, fast-linear: once, on the features of the centre crops
        feature_fn = backbone if config.mode == "knn" else probe
        bank, bank_labels = features_in_eval_mode(backbone, feature_fn, train_set, *options)
        val, val_labels = features_in_eval_mode(backbone, feature_fn, val_set, *options)
        if config.mode == "knn":
            top1, top5 = (round(v, 2) for v in knn_classify(
                bank, bank_labels, val, val_labels, num_classes, config.knn_k, config.knn_t))
            extra = dict(k=config.knn_k, temperature=config.knn_t)
        else:
            labelled = bank_labels >= 0
            classifier = fit_linear(bank[labelled], bank_labels[labelled], num_classes,
                                    config.epochs, lr, seed=config.seed)
            top1, top5 = accuracy(classifier, val, val_labels)
            extra = dict(epochs=config.epochs, lr=lr, optimizer="adam", batch_size=1024)
        write(dict(extra, final_top1=top1, final_top5=top5, best_top1=top1, best_top5=top5))
    elif config.mode == "linear":
        write(dict(epochs=config.epochs, lr=lr, global_batch=global_batch,
                   optimizer="sgd" if backbones.is_vit(config.arch) else "lars"))
        val, val_labels = features_in_eval_mode(backbone, probe, val_set, *options)  # once
        loader = train_loader_for(train_set, config.batch_size, config.workers, device, rank,
                                  world_size, config.seed)
        classifier, _ = train_linear_probe(
            backbone, loader, val, val_labels, num_classes, config.epochs, lr, device, world_size,
            autocast, scaler, memory_format, config.n_last_blocks, report, rank)
    else:  # finetune: the whole network in train mode on a labelled subset
        if config.subset_file:
            if not hasattr(train_set, "samples"):
                raise UserError("--subset-file needs --data to be a folder with train/ and val/")
            paths = [path for path, _ in train_set.samples]
            indices, listed = subset_from_file(paths, config.subset_file)
            log(f"{config.subset_file}: {listed} file names listed, {len(indices)} images of "
                f"{config.data}/train match")
            if not indices:
                raise UserError(f"no file of {config.data}/train is named in {config.subset_file}")
        else:
            indices = balanced_subset(dataset_labels(train_set), config.label_fraction or 0.01,
                                      config.seed)
        fraction = len(indices) / len(train_set)
        epochs = config.epochs or (60 if fraction < 0.05 else 30)
        classifier = finetune_net(backbone, num_classes)
        head_note = init_head_from_dino(classifier, info["head"])
        log(f"{len(indices)} labelled images ({100 * fraction:.2f} %), {epochs} epochs, "
            f"lr {lr:.4g}; {head_note}")
        write(dict(epochs=epochs, lr=lr, global_batch=global_batch, labelled_images=len(indices),
                   label_fraction=fraction, head_init=head_note))
        # SyncBN across GPUs, as SSLight's fine-tuning: BN of the backbone and of the head
        classifier = backbones.sync_batchnorm(classifier, device, world_size)
        classifier.to(device, memory_format=memory_format)
        model = nn.parallel.DistributedDataParallel(classifier) if world_size > 1 else classifier
        loader = train_loader_for(torch.utils.data.Subset(train_set, indices), config.batch_size,
                                  config.workers, device, rank, world_size, config.seed)
        normalize = lambda images: views.normalize(images, device, memory_format)
        logits = lambda: features_in_eval_mode(classifier, classifier, val_set, *options)
        evaluate = lambda: dict(zip(("top1", "top5"), accuracy(nn.Identity(), *logits())))
        train_and_evaluate(model, finetune_optimizer(classifier, lr), loader, epochs, lr, normalize,
                           evaluate, device, world_size, autocast, scaler, report, rank)
        backbone = classifier.backbone
    best = (f" (best top-1 {result['best_top1']:.2f} % in epoch {result['best_epoch']})"
            if trains else "")
    log(f"{tag}{config.mode}: top-1 {result['final_top1']:.2f} %, top-5 {result['final_top5']:.2f}"
        f" %{best}; {len(train_set)} train / {len(val_set)} val images; results in {config.output}")
    barrier()
    return dict(backbone=backbone, classifier=classifier, result=result)


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
# ---- end of plumbing ----


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
