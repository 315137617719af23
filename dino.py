"""DINO pre-training with SSLight's views (Tan, Saleh, Martinez, ICLR 2023). The teacher sees the 2
global crops, the student every crop; the student learns to match the teacher's centred, sharpened
output, and the teacher is an EMA of the student. SSLight changes only the crops and loss weights
(views.py). Defaults: the paper's (SSLight's exp_yamls/dino). Output: <output-dir>/{args.json,
log.jsonl, checkpoint.pth}; a rerun resumes.

    torchrun --nproc_per_node=8 dino.py --arch vit_tiny --data /path/imagenet/train
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

# The paper's settings per backbone family (SSLight's dino_cnn_*.yaml / dino_vit_*.yaml) for unset
# flags; warm-ups in epochs of the paper's 200-epoch runs are scaled down for shorter runs.
PAPER_DEFAULTS = {
    "cnn": dict(out_dim=4096, use_bn_in_head=1, norm_last_layer=1, optimizer="lars", lr=0.48,
                min_lr=0.0048, weight_decay=1e-6, weight_decay_end=1e-6, drop_path=0.0,
                warmup_teacher_temp_epochs=50),
    "vit": dict(out_dim=65536, use_bn_in_head=0, norm_last_layer=0, optimizer="adamw", lr=5e-4,
                min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4, drop_path=0.1,
                warmup_teacher_temp_epochs=30),
}
PAPER_EPOCHS = 200
# This machine's and command's settings, never taken from a checkpoint.
THIS_RUN = {"output_dir", "workers", "log_every", "device", "amp", "export", "compile"}
# What a resume may change (a moved --data: its size is checked); other typed flags must match.
RESUMABLE = THIS_RUN | {"data", "eval_data", "eval_every", "epochs", "views_on"}
# Each numeric flag's range (None: the paper's value), checked before anything is made.
FLAG_RANGES = dict(
    dict.fromkeys(["epochs", "batch_size", "log_every", "eval_every"], (1, math.inf)),
    **dict.fromkeys(["workers", "warmup_teacher_temp_epochs", "freeze_last_layer", "min_lr",
                     "weight_decay", "weight_decay_end", "clip_grad"], (0, math.inf)),
    seed=(0, 2**32 - 1), out_dim=(2, math.inf), center_momentum=(0, 1), momentum_teacher=(0, 1),
    drop_path=(0, 0.99))  # out_dim 1: a one-way softmax is constant, its loss exactly 0
POSITIVE_FLAGS = ["lr", "student_temp", "teacher_temp", "warmup_teacher_temp"]


def get_args_parser():
    paper = lambda key: f"CNN {PAPER_DEFAULTS['cnn'][key]}, ViT {PAPER_DEFAULTS['vit'][key]}"
    parser = argparse.ArgumentParser(description="DINO pre-training (SSLight recipes)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run_arg = parser.add_argument_group("run").add_argument
    run_arg("--arch", default="resnet18", choices=backbones.ARCHS,
            help="paper: mobilenet_v2, resnet18/34, vit_tiny")
    run_arg("--data", default="synthetic", help=views.DATA_HELP)
    run_arg("--output-dir", help="default runs/dino-<arch>; a rerun resumes from its checkpoint")
    run_arg("--epochs", type=int, default=PAPER_EPOCHS, help="paper 200; more extends a run")
    run_arg("--batch-size", type=int, default=128, help="per process; paper 128 x 8 GPUs = 1024")
    run_arg("--workers", type=int, help="loader processes; default: cores / processes, <= 8")
    run_arg("--seed", type=int, default=0)
    run_arg("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run_arg("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
            help="auto: bf16 from compute capability 8.0, fp16 below, off on CPUs; the paper: fp32")
    run_arg("--compile", action="store_true", help="torch.compile the student and the teacher")
    run_arg("--log-every", type=int, default=20, help="steps between updates (each one host sync)")
    run_arg("--export", metavar="PATH", help="write the teacher backbone to PATH at the end")
    run_arg("--eval-data", help="kNN monitor (k 20, T 0.07): DIR/{train,val} or a --data name")
    run_arg("--eval-every", type=int, default=1, help="epochs between kNN evaluations")
    views.add_view_args(parser)
    loss_arg = parser.add_argument_group("DINO head and loss (None = the paper's)").add_argument
    loss_arg("--out-dim", type=int, help="prototypes K: " + paper("out_dim"))
    loss_arg("--use-bn-in-head", type=int, choices=[0, 1], help=paper("use_bn_in_head"))
    loss_arg("--norm-last-layer", type=int, choices=[0, 1],
             help="freeze the last layer's weight-norm gain: " + paper("norm_last_layer"))
    loss_arg("--student-temp", type=float, default=0.1)
    loss_arg("--teacher-temp", type=float, default=0.07, help="final; above 0.07 is unstable")
    loss_arg("--warmup-teacher-temp", type=float, default=0.04, help="start of the linear ramp")
    loss_arg("--warmup-teacher-temp-epochs", type=int,
             help=paper("warmup_teacher_temp_epochs") + " of 200 epochs, or that share of the run")
    loss_arg("--center-momentum", type=float, default=0.9)
    loss_arg("--momentum-teacher", type=float, default=0.996,
             help="EMA start, cosine to 1; a run of a few hundred steps needs ~0.99")
    loss_arg("--freeze-last-layer", type=int, default=1, help="epochs without last-layer updates")
    opt_arg = parser.add_argument_group("optimisation").add_argument
    opt_arg("--optimizer", choices=["lars", "adamw", "sgd"], help=paper("optimizer"))
    opt_arg("--lr", type=float, help="per 256 images (x global batch / 256): " + paper("lr"))
    opt_arg("--min-lr", type=float, help="end of the cosine (not scaled): " + paper("min_lr"))
    opt_arg("--warmup-epochs", type=float, help="lr warm-up: 10 of 200 epochs, 5%% of shorter runs")
    opt_arg("--weight-decay", type=float, help=paper("weight_decay") + ", cosine to the end value")
    opt_arg("--weight-decay-end", type=float, help=paper("weight_decay_end"))
    opt_arg("--clip-grad", type=float, default=0.0, help="per-parameter norm clip; the paper: 0")
    opt_arg("--drop-path", type=float, help="the student's stochastic depth: " + paper("drop_path"))
    return parser


def resolve_config(args, given, world_size, saved=None):
    """Flags + the paper's per-arch defaults + the view recipe; on a resume, the checkpoint's."""
    check_ranges(vars(args), dict(FLAG_RANGES, warmup_epochs=(0, args.epochs)), POSITIVE_FLAGS)
    if saved is not None:
        return resumed_config(saved, vars(args), given, THIS_RUN, RESUMABLE)
    config = dict(vars(args), world_size=world_size)
    is_vit = backbones.is_vit(args.arch)
    defaults = PAPER_DEFAULTS["vit" if is_vit else "cnn"]
    config.update({key: value for key, value in defaults.items() if config[key] is None})
    short = min(1.0, args.epochs / PAPER_EPOCHS)  # warm-ups keep their fraction of the paper's run
    if args.warmup_epochs is None:
        config["warmup_epochs"] = 10 * short
    if args.warmup_teacher_temp_epochs is None:
        config["warmup_teacher_temp_epochs"] = round(config["warmup_teacher_temp_epochs"] * short)
    recipe = views.recipe_from_flags("dino", args, is_vit, backbones.PATCH_SIZE)
    config.update(views.resolved_view_flags(recipe))
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


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = g * v / ||v|| per row: nn.utils.weight_norm's (deprecated)
    parameters written out. With g frozen at 1 it is a cosine layer (norm_last_layer)."""

    def __init__(self, in_dim, out_dim, freeze_gain):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_gain)

    def forward(self, x):
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class DINOHead(nn.Module):
    """MLP in -> 2048 -> 2048 -> 256 (GELU, BN for CNNs), L2-normalised, WeightNormLinear to K."""

    def __init__(self, in_dim, out_dim, use_bn, norm_last_layer, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        norm = lambda: [nn.BatchNorm1d(hidden_dim)] if use_bn else []
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), *norm(), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), *norm(), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        # made after the init loop: PyTorch's default Linear init, as in the paper's code
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_gain=norm_last_layer)

    def forward(self, x):
        bottleneck = F.normalize(self.mlp(x), dim=-1)
        # The K logits in fp32 under autocast: bf16 would round the teacher's softmax at T = 0.04.
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(bottleneck.float())


class DINONet(nn.Module):
    """The backbone once per crop resolution, the head once on all (DINO's MultiCropWrapper)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        return self.head(backbones.multicrop_features(self.backbone, crops))


def build_dino_net(arch, out_dim, use_bn_in_head, norm_last_layer, drop_path=0.0):
    backbone = backbones.build_backbone(arch, drop_path_rate=drop_path)
    head = DINOHead(backbone.feat_dim, out_dim, bool(use_bn_in_head), bool(norm_last_layer))
    return DINONet(backbone, head)


class DINOLoss(nn.Module):
    """alpha * mean(global-global CE) + beta * mean(global-local CE), SSLight's Sec. 3.3.4.
    gg: (teacher g1, student g2), (teacher g2, student g1); gl: each teacher global view with each
    student local view. alpha = 1/(1+n_local) is official DINO's plain mean over all pairs.
    Outputs are view-major: rows [v * B, (v + 1) * B) belong to view v."""

    def __init__(self, out_dim, local_crops, alpha, beta, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.local_crops, self.alpha, self.beta = local_crops, alpha, beta
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out, teacher_out, teacher_temp):
        """-> (loss, (entropy of the teacher's outputs, of the student's global outputs))."""
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        student_logp = student_logp.unflatten(0, (2 + self.local_crops, -1))  # (views, batch, K)
        teacher_p = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)
        teacher_p = teacher_p.detach().unflatten(0, (2, -1))
        # ce[t, v] = batch mean of -sum_k p_teacher(t) log p_student(v), elementwise in fp32 as in
        # official DINO (a matmul would run in bf16 under autocast)
        ce = torch.stack([-(teacher_p[t] * student_logp).sum(-1).mean(-1) for t in range(2)])
        loss = (ce[0, 1] + ce[1, 0]) / 2
        if self.local_crops:
            loss = self.alpha * loss + self.beta * ce[:, 2:].sum() / (2 * self.local_crops)
        with torch.no_grad():  # a flat teacher (entropy ~ ln K) is DINO's collapse to uniform
            teacher_entropy = -(teacher_p * teacher_p.clamp_min(1e-12).log()).sum(-1).mean()
            student_entropy = -(student_logp[:2].exp() * student_logp[:2]).sum(-1).mean()
        return loss, (teacher_entropy, student_entropy)

    @torch.no_grad()
    def update_center(self, teacher_out):
        """c <- m * c + (1 - m) * the mean teacher output of both global views on ALL processes."""
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
        if dist.is_initialized():
            dist.all_reduce(batch_sum)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.center.mul_(self.center_momentum).add_(batch_sum / (len(teacher_out) * world_size),
                                                    alpha=1 - self.center_momentum)


def teacher_temp_schedule(start, end, warmup_epochs):
    """epoch -> temperature: linear start -> end over warmup_epochs, then end (official DINO)."""
    return lambda epoch: (start + (end - start) * epoch / warmup_epochs if epoch < warmup_epochs
                          else end)


@torch.no_grad()
def ema_update(ema_params, params, momentum):
    """ema = m * ema + (1 - m) * online, parameters only: the EMA network's BN buffers come from its
    own train-mode forward. torch._foreach_lerp_: the whole list in one kernel."""
    torch._foreach_lerp_(ema_params, params, 1.0 - momentum)


def clip_gradients(params, clip):
    """Official DINO clips each parameter's gradient to norm <= clip (not one global norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    scales = (clip / (torch.stack(torch._foreach_norm(grads)) + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scales.unbind())


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
    output_dir = args.output_dir or os.path.join("runs", f"dino-{args.arch}")
    checkpoint_path = os.path.join(output_dir, "checkpoint.pth")
    checkpoint = load_checkpoint(checkpoint_path, "dino", device)
    saved = checkpoint and checkpoint["config"]
    config = resolve_config(args, given_flags(parser, argv), world_size, saved)
    if config.export:
        check_export_path(config.export)
    config.amp, amp_note = resolve_amp(config.amp, device)
    config.workers = loader_workers(config.workers)
    done, epochs = (checkpoint["epoch"] if checkpoint else 0), config.epochs
    if checkpoint and epochs < done:
        raise UserError(f"--epochs {epochs} cannot shorten a run of {done} finished epochs")
    if checkpoint and done == epochs:
        log(f"this run is finished: {done} epochs; checkpoint.pth and log.jsonl in {output_dir}")
        if config.export and rank == 0:
            backbones.export_backbone(checkpoint["teacher"], config.export, config.arch)
        return dict(checkpoint=checkpoint)
    if checkpoint and saved["world_size"] != world_size:  # a finished run exports from any number
        raise UserError(f"resume on {saved['world_size']} process(es) as trained, not {world_size}")
    if checkpoint and epochs != saved["epochs"]:
        log(f"extending the run from {saved['epochs']} to {epochs} epochs: schedules recomputed")
    log(f"DINO {config.arch} | {world_size} process(es) on {device}, amp {config.amp} {amp_note}")
    log("configuration:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(vars(config).items())))

    # ============ data: every path and size is checked before the first step ============
    recipe = views.recipe_from_flags("dino", config, backbones.is_vit(config.arch),
                                     backbones.PATCH_SIZE)
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
    iters_per_epoch, global_batch = len(loader), config.batch_size * world_size
    if iters_per_epoch == 0:
        raise UserError(f"--batch-size {config.batch_size}: only {len(sampler)} images per process")
    if checkpoint and checkpoint["num_images"] != len(dataset):
        raise UserError(f"--data {config.data} now has {len(dataset)} images, the run was trained "
                        f"on {checkpoint['num_images']}: use the same data or another --output-dir")
    log(f"{len(dataset)} images, {iters_per_epoch} steps/epoch of {global_batch} images")
    if rank == 0:  # every check has passed: the run folder is made (and locked) only now
        lock_output_dir(output_dir)

    # ============ student and teacher ============
    dino_net = lambda drop_path: build_dino_net(config.arch, config.out_dim, config.use_bn_in_head,
                                                config.norm_last_layer, drop_path)
    memory_format = backbones.memory_format(config.arch, device)
    # SyncBN in the teacher too: it runs in train mode, its BN uses batch statistics.
    to_device = lambda net: backbones.sync_batchnorm(net, device, world_size).to(
        device, memory_format=memory_format)
    student, teacher = to_device(dino_net(config.drop_path)), to_device(dino_net(0.0))
    # DDP broadcasts rank 0's student to every rank; the teacher starts as a copy of that student.
    student_ddp = nn.parallel.DistributedDataParallel(student) if world_size > 1 else student
    # --compile compiles the forwards; `student` and `teacher` keep the state dicts and the EMA.
    student_fwd, teacher_fwd = (torch.compile(m) if config.compile else m
                                for m in (student_ddp, teacher))
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)  # an EMA of the student, never trained by backprop
    dino_loss = DINOLoss(config.out_dim, config.local_crops, *config.loss_weights,
                         config.student_temp, config.center_momentum).to(device)

    # ============ optimizer and schedules (per step; the teacher temperature per epoch) ===========
    groups = param_groups([student])
    optimizer = (LARS(groups) if config.optimizer == "lars" else
                 torch.optim.SGD(groups, lr=0.0, momentum=0.9) if config.optimizer == "sgd" else
                 torch.optim.AdamW(groups, fused=device.type == "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    peak_lr = config.lr * config.batch_size * world_size / 256
    steps = (epochs, iters_per_epoch)
    lr_schedule = cosine_schedule(peak_lr, config.min_lr, *steps, config.warmup_epochs)
    wd_schedule = cosine_schedule(config.weight_decay, config.weight_decay_end, *steps)
    momentum_schedule = cosine_schedule(config.momentum_teacher, 1.0, *steps)
    teacher_temps = teacher_temp_schedule(config.warmup_teacher_temp, config.teacher_temp,
                                          config.warmup_teacher_temp_epochs)
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())
    last_layer_params = list(student.head.last_layer.parameters())
    amp_dtype = torch.float16 if config.amp == "fp16" else torch.bfloat16
    autocast = torch.autocast(device.type, amp_dtype, enabled=config.amp != "off")
    knn = lambda: knn_monitor(teacher.backbone, *eval_sets, 256, config.workers, device, rank,
                              world_size, autocast, memory_format)

    # ============ resume, or the untrained network's kNN as epoch 0 ============
    stateful = dict(student=student, teacher=teacher, optimizer=optimizer, dino_loss=dino_loss)
    if checkpoint:
        for name, state_owner in stateful.items():
            state_owner.load_state_dict(checkpoint[name])
        if checkpoint["scaler"]:  # empty unless saved under fp16 (--amp may change)
            scaler.load_state_dict(checkpoint["scaler"])
        history = checkpoint["history"]
        log(f"resumed from {checkpoint_path} after epoch {done} of {epochs}")
    else:
        history = [dict(epoch=0, **knn())] if eval_sets else []
        if history:
            log(f"epoch 0 (untrained): kNN top-1 {history[0]['knn_top1']:.2f} %")
    if rank == 0:  # written only once the settings have passed the checks
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(vars(config), f, indent=2)

    # One step, in official DINO's order: (1) the teacher's forward on the 2 global crops, with its
    # weights from before this step and no graph; (2) the student's forward on every crop, the loss
    # with the previous steps' centre; (3) backward, clip, the frozen last layer's gradient dropped,
    # optimizer step; (4) the EMA, so that the teacher follows the student just updated; (5) the
    # centre last, moved by this batch's teacher outputs for the next step's loss.
    for epoch in range(done, epochs):
        sampler.set_epoch(epoch)
        student.train(), teacher.train()  # the teacher in train mode too: BN on batch statistics
        sums = torch.zeros(4, device=device)  # loss, teacher and student entropy, embedding std
        start = time.time()
        bar = tqdm(views.Prefetcher(loader, device), desc=f"epoch {epoch + 1}/{epochs}",
                   disable=rank != 0, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            it = epoch * iters_per_epoch + i  # global step: the index into the schedules
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(it)
                group["weight_decay"] = wd_schedule(it) * group["wd_factor"]
            crops = views.batch_to_crops(batch, device, memory_format, view_sampler)

            with autocast:
                teacher_out = teacher_fwd(crops[:2])
                student_out = student_fwd(crops)
                loss, entropies = dino_loss(student_out, teacher_out, teacher_temps(epoch))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.clip_grad > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                clip_gradients(student_params, config.clip_grad)
            if epoch < config.freeze_last_layer:
                for p in last_layer_params:  # None, not zero: no weight decay, no momentum either
                    p.grad = None
            scaler.step(optimizer)
            scaler.update()
            ema_update(teacher_params, student_params, momentum_schedule(it))
            dino_loss.update_center(teacher_out)

            # Collapse signals: the entropies vs ln K, and the per-dimension std of the normalised
            # teacher output (~1/sqrt(K) when spread, ~0 when every image gives the same).
            embedding_std = F.normalize(teacher_out.float(), dim=1).std(0).mean()
            sums += torch.stack([loss.detach(), *entropies, embedding_std])
            del teacher_out, student_out, loss  # freed before the next forward's peak
            if (i + 1) % config.log_every == 0 or i + 1 == iters_per_epoch:  # the one host sync
                means = (all_reduce_sum(sums.clone()) / ((i + 1) * world_size)).tolist()
                if not math.isfinite(means[0]):
                    kept = f"epoch {epoch}'s checkpoint is kept" if epoch else "no checkpoint yet"
                    amp_off = "" if config.amp == "off" else "--amp off or "
                    raise SystemExit(f"error: non-finite loss in epoch {epoch + 1}, step {i + 1}; "
                                     f"{kept}. Try {amp_off}a lower --lr")
                img_s = round((i + 1) * global_batch / (time.time() - start), 1)
                bar.set_postfix(loss=f"{means[0]:.4f}", lr=f"{lr_schedule(it):.2e}", img_s=img_s)

        # ============ end of epoch: record, monitor, checkpoint ============
        ln_k = math.log(config.out_dim)
        record = dict(epoch=epoch + 1, loss=means[0], teacher_entropy=means[1],
                      student_entropy=means[2], ln_k=ln_k, embedding_std=means[3],
                      lr=lr_schedule(it), wd=wd_schedule(it), teacher_temp=teacher_temps(epoch),
                      momentum=momentum_schedule(it),
                      img_per_s=round(iters_per_epoch * global_batch / (time.time() - start), 1))
        if eval_sets and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == epochs):
            record.update(knn())
        history.append(record)
        top1 = f", kNN top-1 {record['knn_top1']:.2f} %" if "knn_top1" in record else ""
        log(f"epoch {epoch + 1}/{epochs}: loss {means[0]:.4f} (ln K {ln_k:.3f}), teacher entropy "
            f"{means[1]:.3f}{top1}")
        if means[1] > 0.99 * ln_k:
            log(f"collapse: the teacher's output is uniform (entropy {means[1]:.3f} of ln K "
                f"{ln_k:.3f}) and the loss sits at ln K; try a lower --teacher-temp (and warm-up),"
                " --lr, --out-dim, or for short runs --momentum-teacher")
        elif means[3] < 0.05 / math.sqrt(config.out_dim):
            log("collapse: every image gives the same teacher output (per-dimension std "
                f"{means[3]:.2e}); try a higher --center-momentum or --teacher-temp, a lower --lr")
        if rank == 0:
            states = {name: state_owner.state_dict() for name, state_owner in stateful.items()}
            save_checkpoint(dict(method="dino", config=vars(config), epoch=epoch + 1,
                                 num_images=len(dataset), history=history,
                                 scaler=scaler.state_dict(), **states), checkpoint_path)
            write_log(os.path.join(output_dir, "log.jsonl"), history)

    if config.export and rank == 0:
        backbones.export_backbone(teacher.state_dict(), config.export, config.arch)
    barrier()
    return dict(student=student, teacher=teacher, dino_loss=dino_loss, history=history)


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
