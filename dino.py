"""DINO pre-training with the paper's view sampling (SSLight, Tan, Saleh, Martinez, ICLR 2023).

    python dino.py                                   # CPU/GPU demo on the built-in synthetic shapes
    python dino.py --arch resnet18 --data /path/imagenet/train
    torchrun --nproc_per_node=8 dino.py --arch vit_tiny --local-crops 10 --data /path/imagenet/train

Student and teacher share an architecture (backbone + projection head). The teacher sees the 2
global crops, the student every crop; the student learns to match the teacher's centred,
sharpened output distribution, and the teacher is an EMA of the student. SSLight changes only
the crops and the loss weights (views.py); every number below is the paper's (spec §1.3, §2.0,
§2.1) unless a flag overrides it. Output: <output-dir>/{args.json, log.jsonl, checkpoint.pth}.
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

# The paper's DINO settings per backbone family (spec §2.1). Flags left unset take these.
PAPER_DEFAULTS = {
    "cnn": dict(out_dim=4096, use_bn_in_head=True, norm_last_layer=True, optimizer="lars", lr=0.48,
                min_lr=0.0048, weight_decay=1e-6, weight_decay_end=1e-6, warmup_teacher_temp_epochs=50,
                drop_path=0.0),
    "vit": dict(out_dim=65536, use_bn_in_head=False, norm_last_layer=False, optimizer="adamw", lr=5e-4,
                min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4, warmup_teacher_temp_epochs=30,
                drop_path=0.1),
}


def get_args_parser():
    parser = argparse.ArgumentParser("DINO pre-training (SSLight recipes)", add_help=True,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    training.add_common_args(parser, "dino", default_arch="resnet18")
    m = parser.add_argument_group("DINO head and loss (spec §2.1; None = the paper's value for the arch)")
    m.add_argument("--out-dim", type=int, default=None, help="prototypes K: CNN 4096, ViT 65536. On small data sets 1k-8k trains faster")
    m.add_argument("--use-bn-in-head", type=int, choices=[0, 1], default=None, help="BN after the 2 hidden layers: CNN 1, ViT 0")
    m.add_argument("--norm-last-layer", type=int, choices=[0, 1], default=None,
                   help="freeze the weight-norm gain of the last layer: CNN 1, ViT 0 (0 is better but can be unstable)")
    m.add_argument("--student-temp", type=float, default=0.1)
    m.add_argument("--teacher-temp", type=float, default=0.07, help="final teacher temperature; DINO: above 0.07 is unstable")
    m.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="start of the linear teacher-temperature warm-up")
    m.add_argument("--warmup-teacher-temp-epochs", type=int, default=None, help="CNN 50, ViT 30 (of 200 epochs)")
    m.add_argument("--center-momentum", type=float, default=0.9)
    m.add_argument("--momentum-teacher", type=float, default=0.996,
                   help="EMA start, cosine to 1. DINO advises 0.9995 for a global batch of 256")
    m.add_argument("--freeze-last-layer", type=int, default=1, help="epochs during which the last layer gets no update")
    o = parser.add_argument_group("optimisation (spec §2.0)")
    o.add_argument("--optimizer", default=None, choices=["lars", "adamw", "sgd"], help="CNN lars, ViT adamw")
    o.add_argument("--lr", type=float, default=None,
                   help="base lr per 256 images (peak = lr * global batch / 256): CNN 0.48 (peak 1.92 at 1024), ViT 5e-4")
    o.add_argument("--min-lr", type=float, default=None, help="end of the cosine: CNN 0.0048, ViT 1e-5 (not scaled)")
    o.add_argument("--warmup-epochs", type=int, default=10, help="linear lr warm-up from 0")
    o.add_argument("--weight-decay", type=float, default=None, help="CNN 1e-6 constant, ViT cosine 0.04 -> 0.4")
    o.add_argument("--weight-decay-end", type=float, default=None)
    o.add_argument("--clip-grad", type=float, default=0.0, help="per-parameter gradient norm clip; the paper uses none (0)")
    o.add_argument("--drop-path", type=float, default=None, help="student stochastic depth: ViT 0.1")
    return parser


def resolve_defaults(args):
    family = "vit" if args.arch.startswith("vit") else "cnn"
    for key, value in PAPER_DEFAULTS[family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------------------------
# Model: backbone + DINO projection head
# ----------------------------------------------------------------------------------------------

class WeightNormLinear(nn.Module):
    """Linear(in, out, bias=False) with weight = g * v / ||v|| per output row, the same
    parameters (weight_g, weight_v) as nn.utils.weight_norm, written out because that API is
    deprecated. With g frozen at 1 this is a pure cosine layer (norm_last_layer)."""

    def __init__(self, in_dim, out_dim, freeze_gain):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_gain)

    def forward(self, x):
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class DINOHead(nn.Module):
    """in -> 2048 -> 2048 -> 256 MLP (GELU; BN after the hidden layers for CNNs), L2-normalised
    256-d bottleneck, then a weight-normalised Linear(256 -> K) without bias (spec §2.1)."""

    def __init__(self, in_dim, out_dim, use_bn, norm_last_layer, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        layers = []
        for d_in, d_out in [(in_dim, hidden_dim), (hidden_dim, hidden_dim)]:
            layers += [nn.Linear(d_in, d_out)] + ([nn.BatchNorm1d(d_out)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        # Created after the init loop: keeps PyTorch's default Linear init, as the paper's code.
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_gain=norm_last_layer)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINONet(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        # Backbone once per resolution group, head once on everything (spec §2.0).
        return self.head(multicrop_features(self.backbone, crops))


def build_dino_net(args, drop_path):
    backbone = build_backbone(args.arch, drop_path_rate=drop_path)
    head = DINOHead(backbone.feat_dim, args.out_dim, bool(args.use_bn_in_head), bool(args.norm_last_layer))
    return DINONet(backbone, head)


# ----------------------------------------------------------------------------------------------
# Loss: cross-entropy between centred/sharpened teacher and student, SSLight-weighted
# ----------------------------------------------------------------------------------------------

class DINOLoss(nn.Module):
    """alpha * mean(global-global CE) + beta * mean(global-local CE)   (spec §1.3)

    gg pairs: (teacher g1, student g2), (teacher g2, student g1)          -> n_gg = 2
    gl pairs: every teacher global view with every student local view    -> n_gl = 2 * n_local
    With alpha = 1/(1+n_local) this is DINO's plain average over all 2 * (n_crops - 1) pairs.
    Outputs are view-major: rows [v * B, (v + 1) * B) belong to view v."""

    def __init__(self, out_dim, local_crops, alpha, beta, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.local_crops, self.alpha, self.beta = local_crops, alpha, beta
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out, teacher_out, teacher_temp):
        n_views = 2 + self.local_crops
        # (views, batch, K): row v * B + b of the outputs is image b seen in view v.
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).unflatten(0, (n_views, -1))
        teacher_p = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach().unflatten(0, (2, -1))
        # ce[t, v] = mean over the batch of -sum_k p_teacher(view t) * log p_student(view v).
        # Elementwise in fp32, as DINO: a matmul here would run in bf16 under autocast (or TF32).
        ce = torch.stack([-(teacher_p[t] * student_logp).sum(-1).mean(-1) for t in range(2)])
        global_global = (ce[0, 1] + ce[1, 0]) / 2
        if self.local_crops == 0:
            loss = global_global
        else:
            global_local = ce[:, 2:].sum() / (2 * self.local_crops)
            loss = self.alpha * global_global + self.beta * global_local
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out):
        """c <- m * c + (1 - m) * mean of the raw teacher outputs over both global views and all
        GPUs (the all-reduce people forget when porting, official_repos §1.1)."""
        batch_sum = training.all_reduce_sum(teacher_out.float().sum(dim=0, keepdim=True))
        world = dist.get_world_size() if training.distributed() else 1
        batch_center = batch_sum / (len(teacher_out) * world)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def teacher_temp_schedule(args):
    """Per epoch: linear warm-up_teacher_temp -> teacher_temp, then constant (spec §2.1)."""
    warm = args.warmup_teacher_temp_epochs
    ramp = [args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) * e / max(warm, 1)
            for e in range(warm)]
    return (ramp + [args.teacher_temp] * args.epochs)[:args.epochs]


@torch.no_grad()
def ema_update(teacher_params, student_params, momentum):
    """teacher = m * teacher + (1 - m) * student, parameters only (BN buffers are the teacher's
    own, from its train-mode forward), in one foreach call instead of a Python loop."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


def clip_gradients(params, clip):
    """DINO clips every parameter's gradient to norm <= clip separately (not a global norm);
    computed without host syncs."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def main(args):
    run = training.setup_run(args)
    resolve_defaults(args)
    recipe = training.recipe_from_args(args, "dino")
    alpha, beta = recipe.alpha_beta
    checkpoint_path = training.prepare_output_dir(args, "dino", run)
    log = print if run.main else (lambda *a, **k: None)
    if args.data in (None, "synthetic"):
        log("training on the built-in synthetic shapes demo set (pass --data DIR for real images)")
    log(f"DINO {args.arch} | world {run.world} on {run.device} | views: {describe(recipe)}")

    # ============ data ============
    dataset = training.build_dataset(args.data, MultiCropTransform(recipe))
    loader = training.build_train_loader(dataset, args, run)
    iters_per_epoch = args.iters_per_epoch = len(loader)  # a resume must see the same count
    log(f"{len(dataset)} images, {iters_per_epoch} iterations/epoch of {args.batch_size} x {run.world}")

    # ============ student and teacher ============
    student = build_dino_net(args, drop_path=args.drop_path)
    teacher = build_dino_net(args, drop_path=0.0)  # the teacher has no stochastic depth
    # SyncBN for the teacher too: it runs in train mode, its BN uses batch statistics.
    student, memory_format = training.to_device(student, run, args.arch)
    teacher, _ = training.to_device(teacher, run, args.arch)
    # DDP broadcasts rank 0's student to every rank; the teacher starts as a copy of that student.
    student_ddp = nn.parallel.DistributedDataParallel(student) if run.world > 1 else student
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)  # no backprop through the teacher; it is an EMA of the student
    dino_loss = DINOLoss(args.out_dim, recipe.local_crops, alpha, beta, args.student_temp,
                         args.center_momentum).to(run.device)

    # ============ optimizer and schedules (one value per iteration) ============
    optimizer = training.build_optimizer(args.optimizer, training.param_groups(student), run)
    scaler = training.grad_scaler(run, args.amp)
    warmup_epochs = training.clamp_warmup("--warmup-epochs", args.warmup_epochs, args.epochs, log)
    args.warmup_teacher_temp_epochs = training.clamp_warmup(
        "--warmup-teacher-temp-epochs", args.warmup_teacher_temp_epochs, args.epochs, log)
    peak_lr = args.lr * args.batch_size * run.world / 256
    lr_schedule = training.cosine_schedule(peak_lr, args.min_lr, args.epochs, iters_per_epoch, warmup_epochs)
    wd_schedule = training.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    momentum_schedule = training.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)
    teacher_temps = teacher_temp_schedule(args)
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())
    last_layer_params = list(student.head.last_layer.parameters())

    # ============ resume ============
    start_epoch, start_step = 0, 0
    checkpoint = training.load_for_resume(checkpoint_path, args, run, extra_keys=("out_dim",))
    if checkpoint is not None:
        student.load_state_dict(checkpoint["student"])
        teacher.load_state_dict(checkpoint["teacher"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty unless saved under --amp fp16 (switching --amp is allowed)
            scaler.load_state_dict(checkpoint["scaler"])
        dino_loss.load_state_dict(checkpoint["dino_loss"])
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step_in_epoch"]
        log(f"resumed from {checkpoint_path}: epoch {start_epoch}, step {start_step} of {iters_per_epoch}")
    else:
        log("arguments:\n" + training.format_args(args))

    def save(epoch, step_in_epoch):
        if run.main:
            training.save_checkpoint(dict(
                method="dino", settings=training.resume_settings(args, run, ("out_dim",)), args=vars(args),
                student=student.state_dict(), teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), dino_loss=dino_loss.state_dict(),
                epoch=epoch, step_in_epoch=step_in_epoch), checkpoint_path)

    json_log = training.JsonLog(args.output_dir, run)
    for epoch in range(start_epoch, args.epochs):
        # ============ one epoch of DINO ============
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip_batches = start_step
        student.train(), teacher.train()  # the teacher stays in train mode: its BN uses batch stats
        progress = training.EpochProgress(args, run, epoch, start_step, iters_per_epoch, checkpoint_path)
        for i, (crops, _) in enumerate(loader, start=start_step):
            it = epoch * iters_per_epoch + i  # global iteration: index into the schedules
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule[it]
                group["weight_decay"] = wd_schedule[it] * group["wd_factor"]
            crops = [c.to(run.device, non_blocking=True, memory_format=memory_format) for c in crops]

            with training.autocast(run, args.amp):
                teacher_out = teacher(crops[:2])  # only the 2 global views
                student_out = student_ddp(crops)
                loss = dino_loss(student_out, teacher_out, teacher_temps[epoch])

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
                clip_gradients(student_params, args.clip_grad)
            if epoch < args.freeze_last_layer:
                for p in last_layer_params:  # None, not zero: no weight decay, no momentum either
                    p.grad = None
            scaler.step(optimizer)
            scaler.update()
            ema_update(teacher_params, student_params, momentum_schedule[it])

            if progress.update(it, lr_schedule[it], loss=loss):
                save(epoch, i + 1)

        # ============ end of epoch: log, monitor, checkpoint ============
        record = dict(epoch=epoch + 1, **progress.close(it), lr=lr_schedule[it], wd=wd_schedule[it],
                      teacher_temp=teacher_temps[epoch], momentum=momentum_schedule[it])
        record.update(training.knn_eval_if_due(teacher.backbone, args, run, epoch))
        log(json.dumps(record))
        json_log.write(**record)
        save(epoch + 1, 0)
        start_step = 0

    if args.export and run.main:
        training.export_backbone(training.strip_prefix(teacher.state_dict(), "backbone."), args.export, args.arch)
    training.cleanup()
    return dict(student=student, teacher=teacher, dino_loss=dino_loss)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
