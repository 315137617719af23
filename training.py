"""Training plumbing shared by dino.py, moco_v2.py and swav.py: the command-line vocabulary, data,
distributed setup, LARS and parameter groups, per-iteration schedules, AMP, checkpoints and logs.

Nothing method-specific lives here: heads, losses, EMA, queues and centering are in each method's
own file. Every function is short and can be copied out on its own.
"""
import argparse
import json
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torchvision
from PIL import Image, ImageDraw
from tqdm import tqdm

import views

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------
# Command line: the flags every script shares, with the paper's values in the help
# ----------------------------------------------------------------------------------------------

def add_common_args(parser, method, default_arch):
    p = parser.add_argument_group("run")
    p.add_argument("--arch", default=default_arch,
                   help="mobilenet_v2 | resnet18 | resnet34 | resnet50 | vit_tiny | vit_small (paper: MNv2, R18, R34, ViT-Tiny)")
    p.add_argument("--data", default="synthetic",
                   help="ImageFolder root (ImageNet layout: DIR/train), a flat folder of images, "
                        "cifar10 | cifar100 | stl10 (torchvision, downloaded into ./data), or synthetic "
                        "(built-in 10-class shapes demo, the default)")
    p.add_argument("--output-dir", default=None, help=f"default runs/{method}-<arch>; auto-resumes from its checkpoint.pth")
    p.add_argument("--epochs", type=int, default=200, help="paper: 200 for every pre-training")
    p.add_argument("--batch-size", type=int, default=128, help="per process; paper: 128 x 8 GPUs = 1024")
    p.add_argument("--workers", type=int, default=8, help="data-loader processes per GPU (the PIL pipeline is the usual bottleneck)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"],
                   help="autocast dtype on CUDA (fp16 adds a GradScaler); the paper trained in fp32. Ignored on CPU")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at epoch ends)")
    p.add_argument("--log-every", type=int, default=20, help="steps between progress-bar updates (each one is a host sync)")
    p.add_argument("--export", default=None, metavar="PATH",
                   help="write the backbone's state_dict (torchvision format for CNNs) to PATH after training, "
                        "or from an existing checkpoint when training is already finished")
    p.add_argument("--eval-data", default=None,
                   help="kNN monitor: a root with train/ and val/ ImageFolders, cifar10, or synthetic")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between kNN evaluations")
    v = parser.add_argument_group("views (spec §1; the paper's recipe is --recipe light)")
    v.add_argument("--recipe", default="light",
                   help="light: global (0.3,1), local (0.05,0.3) at 128 px, loss weights 0.4/0.6. "
                        "baseline: the original method's crops (CNN (0.14,1)/(0.05,0.14), ViT (0.25,1)/(0.05,0.25), 96 px) "
                        "and a plain average over all pairs")
    v.add_argument("--global-size", type=int, default=None, help="224; smaller sizes scale the local size by the same ratio (112 -> 48 / 64)")
    v.add_argument("--local-size", type=int, default=None, help="light 128, baseline 96 (for 224 px global crops)")
    v.add_argument("--local-crops", type=int, default=None, help="6 for CNNs, 10 for ViT-Tiny (the paper does not change it)")
    v.add_argument("--global-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="light (0.3, 1)")
    v.add_argument("--local-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="light (0.05, 0.3)")
    v.add_argument("--loss-weights", type=float, nargs=2, default=None, metavar=("ALPHA", "BETA"),
                   help="weights of the averaged global-global / global-local terms: light 0.4 0.6; "
                        "baseline 1/(1+n_local), n_local/(1+n_local) = a plain average over pairs")
    return parser


def recipe_from_args(args, method):
    """The view recipe of --recipe with every flag override applied. The resolved crop sizes and
    count are written back into args: args.json, the resume check and the kNN monitor use them."""
    recipe = views.get_recipe(method, args.recipe, args.arch, global_size=args.global_size,
                              local_size=args.local_size, local_crops=args.local_crops,
                              global_scale=args.global_scale, local_scale=args.local_scale,
                              loss_weights=args.loss_weights)
    sizes = {recipe.global_size} | ({recipe.local_size} if recipe.local_crops else set())
    if args.arch.startswith("vit") and any(size % 16 for size in sizes):
        raise SystemExit(f"{args.arch} needs crop sizes that are multiples of its 16 px patches, got global "
                         f"{recipe.global_size} / local {recipe.local_size}: use --global-size 224 or 112 "
                         "(locals 96/128 or 48/64), or set --local-size")
    args.local_crops, args.global_size, args.local_size = recipe.local_crops, recipe.global_size, recipe.local_size
    return recipe


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond", "star",
          "h_stripes", "v_stripes", "checker"]


class SyntheticShapes(torch.utils.data.Dataset):
    """A deterministic 10-class demo set made on the fly: class = a shape or texture, drawn at a
    random position, size and rotation, in random colours on a random background. Colour and
    position carry no label information, so a network must learn shape to separate classes:
    something SSL can visibly learn on a CPU in minutes. No files, no download."""

    def __init__(self, num_images=2000, size=64, transform=None, seed=0):
        self.num_images, self.size, self.transform, self.seed = num_images, size, transform, seed
        self.classes = SHAPES

    def __len__(self):
        return self.num_images

    def render(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        rand = lambda: torch.rand((), generator=g).item()
        colour = lambda: tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
        label, s = index % len(SHAPES), self.size
        image = Image.new("RGB", (s, s), colour())
        draw = ImageDraw.Draw(image)
        fg = colour()
        shape = SHAPES[label]
        if shape.endswith("stripes") or shape == "checker":
            period = max(2, int(s * (0.1 + 0.15 * rand())))
            for a in range(0, s, period):
                for b in range(0, s, period):
                    on = {"h_stripes": (b // period) % 2, "v_stripes": (a // period) % 2,
                          "checker": (a // period + b // period) % 2}[shape]
                    if on:
                        draw.rectangle([a, b, a + period - 1, b + period - 1], fill=fg)
            return image, label
        r = s * (0.2 + 0.15 * rand())
        cx, cy = r + (s - 2 * r) * rand(), r + (s - 2 * r) * rand()
        turn = 2 * math.pi * rand()
        polygon = lambda radii, n: [(cx + radii[k % len(radii)] * math.cos(turn + 2 * math.pi * k / n),
                                     cy + radii[k % len(radii)] * math.sin(turn + 2 * math.pi * k / n)) for k in range(n)]
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif shape == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r / 3)))
        elif shape == "square":
            draw.polygon(polygon([r], 4), fill=fg)
        elif shape == "diamond":
            draw.polygon(polygon([r, 0.5 * r], 4), fill=fg)
        elif shape == "triangle":
            draw.polygon(polygon([r], 3), fill=fg)
        elif shape == "star":
            draw.polygon(polygon([r, 0.4 * r], 10), fill=fg)
        elif shape == "cross":
            w = r / 3
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
        return image, label

    def __getitem__(self, index):
        image, label = self.render(index)
        return (self.transform(image) if self.transform else image), label


class ImageFiles(torch.utils.data.Dataset):
    """Images under `root`: an ImageFolder layout (root/<class>/<image>) or a flat folder of
    unlabelled images (label 0). Non-image files are ignored. An unreadable image is skipped
    with a warning naming it (the next image is used instead); more than 1% bad images (counted
    per loader process) stops the run with an error."""

    def __init__(self, root, transform=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root!r}: no such folder")
        self.root, self.transform = root, transform
        is_image = lambda name: name.lower().endswith(IMAGE_EXTENSIONS)
        subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        self.samples = []
        self.classes = [c for c in subdirs if any(is_image(f) for _, _, fs in os.walk(os.path.join(root, c)) for f in fs)]
        for label, c in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
                self.samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if is_image(f)]
        if not self.classes:  # flat folder of unlabelled images
            self.classes = ["unlabelled"]
            self.samples = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root)) if is_image(f)]
        if not self.samples:
            raise RuntimeError(f"--data {root!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in it "
                               "or in its class sub-folders")
        self.bad_files = set()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as f:
                    image = f.convert("RGB")
            except (OSError, ValueError) as error:
                if path not in self.bad_files:
                    self.bad_files.add(path)
                    warnings.warn(f"skipping unreadable image {path}: {error}")
                    if len(self.bad_files) > max(1, 0.01 * len(self.samples)):
                        raise RuntimeError(f"more than 1% of the images under {self.root} are unreadable "
                                           f"({len(self.bad_files)} so far, e.g. {path}); fix the data set")
                continue
            return (self.transform(image) if self.transform else image), label
        raise RuntimeError(f"no readable image under {self.root}")


def build_dataset(data, transform=None, split="train"):
    """--data value -> Dataset yielding (transform(image), label).

    split: "train" (every training image, for pre-training: STL-10 includes its 100k unlabelled
    images), "labelled" (training images with labels, for kNN banks and probes) or "val"."""
    if data in (None, "synthetic"):
        return SyntheticShapes(500 if split == "val" else 2000, transform=transform, seed=1 if split == "val" else 0)
    if data in ("cifar10", "cifar100", "stl10"):
        cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
               "stl10": torchvision.datasets.STL10}[data]
        if data == "stl10":
            which = dict(split={"train": "train+unlabeled", "labelled": "train", "val": "test"}[split])
        else:
            which = dict(train=split != "val")
        try:
            return cls("data", download=True, transform=transform, **which)
        except Exception as error:  # offline and not on disk yet
            raise RuntimeError(f"--data {data}: not found in ./data and could not be downloaded ({error}). "
                               f"Download it once with internet access (torchvision.datasets.{cls.__name__}('data', download=True)) "
                               "or pass an ImageFolder path instead.") from None
    return ImageFiles(data, transform)


def build_eval_datasets(eval_data, transform, train_transform=None):
    """-> (labelled train set, val set): a root with train/ and val/ ImageFolders, or a named
    set. The train set uses train_transform when given (linear probe), else transform (kNN bank)."""
    train_transform = train_transform or transform
    if eval_data in ("synthetic", "cifar10", "cifar100", "stl10"):
        return build_dataset(eval_data, train_transform, "labelled"), build_dataset(eval_data, transform, "val")
    return (ImageFiles(os.path.join(eval_data, "train"), train_transform),
            ImageFiles(os.path.join(eval_data, "val"), transform))


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (also for world size 1: a seeded shuffle per epoch) that can start an
    epoch part-way through, so a resume from a --save-every checkpoint sees the images it had not
    seen yet in that epoch."""
    skip_batches, batch_size = 0, 1

    def __iter__(self):
        indices = list(super().__iter__())
        start, self.skip_batches = self.skip_batches * self.batch_size, 0
        return iter(indices[start:])


def build_train_loader(dataset, args, run):
    sampler = ResumableSampler(dataset, num_replicas=run.world, rank=run.rank, shuffle=True,
                               seed=args.seed, drop_last=True)
    sampler.batch_size = args.batch_size
    if len(sampler) < args.batch_size:
        raise RuntimeError(f"{len(dataset)} images give {len(sampler)} per process, fewer than --batch-size {args.batch_size}")
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        pin_memory=run.device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None)


# ----------------------------------------------------------------------------------------------
# Distributed setup (torchrun, or a single process on one GPU / CPU)
# ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup_run(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python script.py` is a single process
    without a process group (every collective below is guarded)."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        run = Run(dist.get_rank(), dist.get_world_size(), device)
    else:
        run = Run(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick the fastest kernels
        torch.set_float32_matmul_precision("high")  # TF32 matmuls where fp32 remains (cuDNN convs use TF32 by default)
    torch.manual_seed(args.seed + run.rank)
    return run


def distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor):
    if distributed():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def concat_all_gather(tensor):
    """Concatenate `tensor` from every rank along dim 0 (no gradient)."""
    if not distributed():
        return tensor
    tensor = tensor.contiguous()  # one plain layout for the sent and received buffers (not channels_last)
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return torch.cat(out)


def cleanup():
    if distributed():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Optimisation: parameter groups, LARS, schedules, AMP
# ----------------------------------------------------------------------------------------------

def param_groups(*modules):
    """The paper's three groups (spec §2.0), trainable parameters only:
    regularized: ndim >= 2 and not depthwise -> full weight decay, LARS adaptation;
    depthwise:   4-D conv weights with shape[1] == 1 (MobileNetV2) -> no weight decay, LARS kept;
    not regularized: biases and norm parameters (ndim < 2) -> no weight decay, no LARS."""
    regularized, depthwise, not_regularized = [], [], []
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2:
                not_regularized.append(p)
            elif p.ndim == 4 and p.shape[1] == 1:
                depthwise.append(p)
            else:
                regularized.append(p)
    groups = [dict(params=regularized, wd_factor=1.0, lars_exclude=False),
              dict(params=depthwise, wd_factor=0.0, lars_exclude=False),
              dict(params=not_regularized, wd_factor=0.0, lars_exclude=True)]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """LARS as in the paper's code (spec §2.0): g = grad + wd * p; unless the group is
    lars_exclude, g *= eta * ||p|| / ||g|| when both norms are > 0; mu = momentum * mu + g;
    p -= lr * mu. eta 0.001, momentum 0.9, no Nesterov. Written with foreach ops and without
    host syncs (the norm test is a torch.where)."""

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
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if not group["lars_exclude"]:
                param_norms = torch._foreach_norm(params)
                grad_norms = torch._foreach_norm(grads)
                ratios = [torch.where((pn > 0) & (gn > 0), group["eta"] * pn / gn, torch.ones_like(pn))
                          for pn, gn in zip(param_norms, grad_norms)]
                grads = torch._foreach_mul(grads, ratios)
            buffers = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, start_warmup=0.0):
    """One value per iteration (DINO's cosine_scheduler, spec §2.0): linear warm-up from
    start_warmup to base over warmup_epochs, then a cosine from base to final."""
    warmup_iters = int(warmup_epochs * iters_per_epoch)
    total = int(epochs * iters_per_epoch)
    warmup = [start_warmup + (base - start_warmup) * i / warmup_iters for i in range(warmup_iters)]
    rest = total - warmup_iters
    cosine = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / rest)) for i in range(rest)]
    return warmup + cosine


def clamp_warmup(name, warmup_epochs, epochs, log):
    if warmup_epochs > epochs:
        log(f"note: {name} {warmup_epochs} is longer than the run; clamped to {epochs} epochs")
        return epochs
    return warmup_epochs


def autocast(run, amp):
    """bf16/fp16 autocast on CUDA; a no-op context on the CPU or with --amp off."""
    enabled = run.device.type == "cuda" and amp != "off"
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(run.device.type, dtype=dtype, enabled=enabled)


def grad_scaler(run, amp):
    return torch.amp.GradScaler(run.device.type, enabled=run.device.type == "cuda" and amp == "fp16")


# ----------------------------------------------------------------------------------------------
# Checkpoints, logs, export
# ----------------------------------------------------------------------------------------------

def prepare_output_dir(args, method, run):
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{method}-{args.arch}")
    if run.main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(dict(vars(args), world_size=run.world), f, indent=2)
    return os.path.join(args.output_dir, "checkpoint.pth")


def save_checkpoint(state, path):
    """Atomic: write a temporary file, then rename it over the old checkpoint, so a kill
    mid-write never leaves a broken checkpoint.pth."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# Settings whose change would silently shift schedules or shapes on resume.
RESUME_KEYS = ("arch", "epochs", "global_batch", "iters_per_epoch", "recipe", "local_crops", "global_size",
               "local_size")


def load_for_resume(path, args, run, extra_keys=()):
    """The checkpoint at `path` if it exists (else None), after checking that this run's
    settings match the ones it was trained with."""
    if not os.path.exists(path):
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    saved, now = checkpoint["settings"], resume_settings(args, run, extra_keys)
    changed = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if changed:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
        raise SystemExit(f"refusing to resume from {path}: {detail}. The schedules depend on these; "
                         "use the same settings or another --output-dir.")
    return checkpoint


def resume_settings(args, run, extra_keys=()):
    settings = {k: getattr(args, k, None) for k in RESUME_KEYS + tuple(extra_keys) if k != "global_batch"}
    settings["global_batch"] = args.batch_size * run.world
    return settings


class JsonLog:
    """log.jsonl: one JSON object per line (one per epoch), written by rank 0."""

    def __init__(self, output_dir, run):
        self.path, self.run = os.path.join(output_dir, "log.jsonl"), run

    def write(self, **record):
        if self.run.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def strip_prefix(state_dict, prefix):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def export_backbone(state_dict, path, arch):
    """Write a backbone state_dict: for CNNs it loads into torchvision.models.<arch>() with only
    the classifier keys missing; for ViTs into backbones.build_backbone(arch)."""
    state_dict = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state_dict, path)
    fmt = "torchvision" if not arch.startswith("vit") else "backbones.build_backbone"
    print(f"exported {arch} backbone ({len(state_dict)} tensors, {fmt} format) to {path}")


def format_args(args):
    return "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items()))


# ----------------------------------------------------------------------------------------------
# Pieces of the training loop that are the same in every method
# ----------------------------------------------------------------------------------------------

def to_device(model, run, arch, sync_bn=True):
    """SyncBatchNorm when several CUDA processes run (BN statistics over the global batch; it
    needs CUDA, so CPU processes keep their own), channels_last for CNNs on CUDA.
    Returns (model, memory_format): the crops must use the same memory format."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if sync_bn and has_bn and run.world > 1 and run.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = run.device.type == "cuda" and not arch.startswith("vit")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(run.device, memory_format=memory_format), memory_format


def build_optimizer(name, groups, run):
    """lars (CNNs, spec §2.0), adamw (ViT; fused kernel on CUDA) or sgd with momentum 0.9.
    lr and weight decay are set every iteration from the schedules."""
    if name == "lars":
        return LARS(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    return torch.optim.AdamW(groups, fused=run.device.type == "cuda")


def stop_if_not_finite(loss_sum, it, iters_per_epoch, checkpoint_path):
    """One host sync. Called at log steps and before every save, so a checkpoint never holds
    weights that produced a non-finite loss. The sum is all-reduced first: every rank stops
    together instead of leaving the others waiting in a collective."""
    if not math.isfinite(all_reduce_sum(loss_sum.detach().clone()).item()):
        raise SystemExit(f"non-finite loss at iteration {it} (epoch {it // iters_per_epoch}); stopping. "
                         f"The last good checkpoint is kept in {checkpoint_path}. Try --amp off or a lower --lr.")


def knn_eval_if_due(backbone, args, run, epoch):
    """kNN accuracy of `backbone` (not DDP-wrapped) every --eval-every epochs and at the end, with
    every rank extracting its share of the features. {} when not due or without --eval-data."""
    if not args.eval_data or ((epoch + 1) % args.eval_every and epoch + 1 != args.epochs):
        return {}
    from linear_eval import knn_monitor
    return knn_monitor(backbone, args.eval_data, args.global_size, run, workers=args.workers, amp=args.amp)


class EpochProgress:
    """One epoch's bookkeeping, the same for every method: running sums of the step metrics kept
    on the device (no host sync per step), a tqdm bar on rank 0 with loss, lr and img/s every
    --log-every steps, and the non-finite-loss stop before anything is logged or saved."""

    def __init__(self, args, run, epoch, start_step, iters_per_epoch, checkpoint_path):
        self.args, self.run, self.iters, self.checkpoint_path = args, run, iters_per_epoch, checkpoint_path
        self.sums, self.steps, self.start = {}, 0, time.time()
        self.bar = tqdm(total=iters_per_epoch, initial=start_step, disable=not run.main,
                        desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True)

    def images_per_second(self):
        return round(self.steps * self.args.batch_size * self.run.world / (time.time() - self.start), 1)

    def update(self, it, lr, **metrics):
        """After each step; metrics are 0-dim tensors, `loss` first. Returns True when a
        --save-every checkpoint is due (the loss so far is checked first)."""
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.steps += 1
        self.bar.update(1)
        last_of_epoch = (it + 1) % self.iters == 0
        if self.steps % self.args.log_every == 0 or last_of_epoch:
            stop_if_not_finite(self.sums["loss"], it, self.iters, self.checkpoint_path)  # the one host sync
            self.bar.set_postfix(loss=f"{self.sums['loss'].item() / self.steps:.4f}", lr=f"{lr:.2e}",
                                 img_s=self.images_per_second())
        save_due = bool(self.args.save_every) and (it + 1) % self.args.save_every == 0 and not last_of_epoch
        if save_due:
            stop_if_not_finite(self.sums["loss"], it, self.iters, self.checkpoint_path)
        return save_due

    def close(self, it):
        """-> {metric: mean over the epoch's steps and all processes, img_per_s, epoch_time_s}."""
        self.bar.close()
        names = list(self.sums)
        means = all_reduce_sum(torch.stack([self.sums[n] for n in names])) / (self.steps * self.run.world)
        stop_if_not_finite(means[0], it, self.iters, self.checkpoint_path)
        return dict(zip(names, means.tolist()), img_per_s=self.images_per_second(),
                    epoch_time_s=round(time.time() - self.start, 1))
