"""SwAV pre-training with the paper's view sampling (SSLight, Tan, Saleh, Martinez, ICLR 2023).

    python swav.py                                   # CPU/GPU demo on the built-in synthetic shapes
    python swav.py --arch mobilenet_v2 --data /path/imagenet/train
    torchrun --nproc_per_node=8 swav.py --data /path/imagenet/train     # the paper: 8 x 128 images

One network (backbone + projection head + prototypes) sees every crop. The two global crops get
codes: Sinkhorn-Knopp spreads the batch (plus a queue of past embeddings) evenly over K = 3000
prototypes, and every other crop must predict them ("swapped prediction"). There is no teacher
and no EMA. SSLight changes only the crops and the loss weights (views.py); every number below
is the paper's (spec §1.3, §2.0, §2.3) unless a flag overrides it.
Output: <output-dir>/{args.json, log.jsonl, checkpoint.pth}; the checkpoint holds every rank's queue.
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


def get_args_parser():
    parser = argparse.ArgumentParser("SwAV pre-training (SSLight recipes)", add_help=True,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    training.add_common_args(parser, "swav", default_arch="mobilenet_v2")  # the paper's only SwAV arch
    m = parser.add_argument_group("SwAV head, codes and queue (spec §2.3)")
    m.add_argument("--hidden-dim", type=int, default=4096, help="projection MLP width (official SwAV: 2048)")
    m.add_argument("--feat-dim", type=int, default=128, help="L2-normalised embedding fed to the prototypes")
    m.add_argument("--num-prototypes", type=int, default=3000,
                   help="K. A loss stuck at ln(K) (8.006 for 3000) means collapse: try --epsilon 0.03, "
                        "a longer --freeze-prototypes-epochs, or softer augmentation")
    m.add_argument("--temperature", type=float, default=0.1, help="of the softmax that predicts the codes")
    m.add_argument("--epsilon", type=float, default=0.05,
                   help="Sinkhorn entropy regularisation; SwAV's authors advise 0.03 against collapse")
    m.add_argument("--sinkhorn-iterations", type=int, default=3, help="3 already give near-equal prototype masses")
    m.add_argument("--freeze-prototypes-epochs", type=int, default=1,
                   help="epochs (not iterations) during which the prototypes get no update")
    m.add_argument("--queue-length", type=int, default=3840,
                   help="embeddings per assigned crop over all GPUs, trimmed to a multiple of the global batch "
                        "(3072 at 1024); 0 = no queue. Official SwAV uses one below a global batch of 256. If the loss rises "
                        "when the queue starts, start it later or shorten it")
    m.add_argument("--epoch-queue-starts", type=int, default=15, help="epoch at which the queue is created")
    o = parser.add_argument_group("optimisation (spec §2.0, §2.3: LARS, no EMA, no clipping)")
    o.add_argument("--lr", type=float, default=0.3,
                   help="base lr per 256 images (peak = lr * global batch / 256: 1.2 at 1024)")
    o.add_argument("--start-warmup", type=float, default=0.075, help="lr at iteration 0 (absolute, not scaled; capped at the peak lr)")
    o.add_argument("--min-lr", type=float, default=0.0048, help="end of the cosine (absolute)")
    o.add_argument("--warmup-epochs", type=int, default=10, help="linear lr warm-up from --start-warmup")
    o.add_argument("--weight-decay", type=float, default=1e-6, help="constant")
    return parser


# ----------------------------------------------------------------------------------------------
# Model: backbone + projection head + prototypes
# ----------------------------------------------------------------------------------------------

class SwAVNet(nn.Module):
    """backbone -> Linear(feat, 4096) -> BN -> ReLU -> Linear(4096, 128) -> L2-normalise ->
    prototypes Linear(128, K, no bias) (spec §2.3). forward returns (embeddings, scores), both
    view-major: rows [v * B, (v + 1) * B) belong to view v. The submodule names are the checkpoint
    contract with linear_eval.py ("backbone.*")."""

    def __init__(self, backbone, hidden_dim=4096, feat_dim=128, num_prototypes=3000):
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Sequential(nn.Linear(backbone.feat_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                        nn.ReLU(inplace=True), nn.Linear(hidden_dim, feat_dim))
        self.prototypes = nn.Linear(feat_dim, num_prototypes, bias=False)
        # The paper re-initialises the whole module (spec §2.3); a ViT keeps its own init.
        for m in (self.modules() if not getattr(backbone, "is_vit", False) else [*self.projection, self.prototypes]):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):  # prototypes included: N(0, 0.01), bias 0
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def normalize_prototypes(self):
        """Every prototype back on the unit sphere, so scores are cosines (spec §2.3)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, crops):
        # Backbone once per resolution group, head once on everything (spec §2.0).
        embeddings = F.normalize(self.projection(multicrop_features(self.backbone, crops)), dim=1)
        return embeddings, self.prototypes(embeddings)


def build_swav_net(args):
    return SwAVNet(build_backbone(args.arch), args.hidden_dim, args.feat_dim, args.num_prototypes)


# ----------------------------------------------------------------------------------------------
# Codes: distributed Sinkhorn-Knopp, with an optional queue of past embeddings
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iterations=3):
    """(B_local, K) prototype scores -> (B_local, K) codes: each row (sample) sums to 1, each
    prototype gets about B/K of the mass, B = B_local x world size (spec §2.3, official_repos §1.3).
    Always float32: exp(1 / 0.05) = 4.9e8 overflows fp16. Each prototype's max score over all
    ranks is subtracted first: the first per-prototype normalisation cancels any per-prototype
    factor exactly, and no prototype's mass can then overflow or be 0, even with a smaller epsilon."""
    scores = scores.float()
    shift = scores.max(dim=0).values  # (K,): per prototype, the same on every rank
    if training.distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    Q = torch.exp((scores - shift) / epsilon).t()  # K x B_local
    K, B = Q.shape[0], Q.shape[1] * (dist.get_world_size() if training.distributed() else 1)
    Q /= training.all_reduce_sum(Q.sum())
    for _ in range(iterations):
        Q /= training.all_reduce_sum(Q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)  # each sample: mass 1/B (samples are local, no reduce)
        Q /= B
    return (Q * B).t()


class EmbeddingQueue(nn.Module):
    """This rank's FIFO of the last `rows` normalised embeddings of g1 and g2 (2 x rows x D).
    It lives outside DDP: each rank keeps its own, and Sinkhorn's all-reduces combine them."""

    def __init__(self, rows, dim):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(2, rows, dim))
        self.active = False

    def ready(self):
        """Full = its last row is non-zero (a normalised embedding never is). One host sync per
        step until then, none after."""
        if not self.active:
            self.active = bool(self.embeddings[:, -1].any())
        return self.active

    @torch.no_grad()
    def push(self, new):
        """new: (2, B, D). Shift everything B rows back; the newest go to the front."""
        batch = new.shape[1]
        self.embeddings[:, batch:] = self.embeddings[:, :-batch].clone()
        self.embeddings[:, :batch] = new


@torch.no_grad()
def assign_codes(scores, embeddings, prototypes, queue, batch, epsilon=0.05, iterations=3):
    """Codes of the 2 global crops (CROPS_FOR_ASSIGN = [0, 1], spec §1.3). Once the queue is
    full, its scores (against the current prototypes) are stacked in front of the batch so that
    Sinkhorn's equipartition is over more samples than a small batch; only the last `batch` rows
    are kept. Then this step's g1/g2 embeddings are pushed."""
    use_queue = queue is not None and queue.ready()
    codes = []
    for i in range(2):
        s = scores[i * batch:(i + 1) * batch].float()
        if use_queue:
            s = torch.cat([queue.embeddings[i] @ prototypes.float().t(), s])
        codes.append(sinkhorn(s, epsilon, iterations)[-batch:])
    if queue is not None:
        queue.push(embeddings[:2 * batch].float().view(2, batch, -1))
    return codes


def swapped_prediction_loss(scores, codes, local_crops, alpha, beta, temperature=0.1):
    """alpha * mean(global-global CE) + beta * mean(global-local CE)   (spec §1.3)

    ce[a, v] = mean over the batch of -sum_k q_a log softmax(scores_v / T): the code of global
    crop a predicted from crop v. gg: (0 <- 1), (1 <- 0); gl: each code from each local.
    With alpha = 1/(1+n_local) this is SwAV's sum over all (a, v != a) / (2 * (n_crops - 1))."""
    logp = F.log_softmax(scores.float() / temperature, dim=1).unflatten(0, (2 + local_crops, -1))
    # Elementwise in fp32 (a matmul would run in TF32 on CUDA): (2, n_crops) matrix of mean CEs.
    ce = torch.stack([-(code * logp).sum(-1).mean(-1) for code in codes])
    global_global = (ce[0, 1] + ce[1, 0]) / 2
    if local_crops == 0:
        return global_global
    return alpha * global_global + beta * ce[:, 2:].sum() / (2 * local_crops)


def queue_rows(args, run, log):
    """Per-rank queue rows: --queue-length trimmed to a multiple of the global batch, split over
    the ranks (3840 -> 3072 at 1024 -> 384 per GPU, spec §2.3). 0 = no queue."""
    global_batch = args.batch_size * run.world
    trimmed = args.queue_length - args.queue_length % global_batch
    if args.queue_length and not trimmed:
        log(f"note: --queue-length {args.queue_length} < global batch {global_batch}: no queue")
    return trimmed // run.world


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def main(args):
    run = training.setup_run(args)
    recipe = training.recipe_from_args(args, "swav")
    alpha, beta = recipe.alpha_beta
    checkpoint_path = training.prepare_output_dir(args, "swav", run)
    log = print if run.main else (lambda *a, **k: None)
    if args.data in (None, "synthetic"):
        log("training on the built-in synthetic shapes demo set (pass --data DIR for real images)")
    log(f"SwAV {args.arch} | world {run.world} on {run.device} | views: {describe(recipe)}")

    # ============ data ============
    dataset = training.build_dataset(args.data, MultiCropTransform(recipe))
    loader = training.build_train_loader(dataset, args, run)
    iters_per_epoch = args.iters_per_epoch = len(loader)  # a resume must see the same count
    log(f"{len(dataset)} images, {iters_per_epoch} iterations/epoch of {args.batch_size} x {run.world}")

    # ============ model ============
    model = build_swav_net(args)
    model, memory_format = training.to_device(model, run, args.arch)  # SyncBN over the global batch
    model_ddp = nn.parallel.DistributedDataParallel(model) if run.world > 1 else model  # broadcasts rank 0
    rows = queue_rows(args, run, log)
    queue = None  # created at --epoch-queue-starts; outside DDP, one per rank

    # ============ optimizer and schedules (one value per iteration) ============
    optimizer = training.LARS(training.param_groups(model))
    scaler = training.grad_scaler(run, args.amp)
    warmup_epochs = training.clamp_warmup("--warmup-epochs", args.warmup_epochs, args.epochs, log)
    peak_lr = args.lr * args.batch_size * run.world / 256
    start_warmup = min(args.start_warmup, peak_lr)  # below a global batch of 64 it would "warm up" downwards
    if start_warmup < args.start_warmup:
        log(f"note: --start-warmup {args.start_warmup} is above the peak lr {peak_lr:.4g}; starting at the peak")
    lr_schedule = training.cosine_schedule(peak_lr, args.min_lr, args.epochs, iters_per_epoch, warmup_epochs,
                                           start_warmup=start_warmup)

    # ============ resume ============
    extra_keys = ("num_prototypes", "feat_dim", "hidden_dim", "queue_length")
    start_epoch, start_step = 0, 0
    checkpoint = training.load_for_resume(checkpoint_path, args, run, extra_keys=extra_keys)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty unless saved under --amp fp16 (switching --amp is allowed)
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step_in_epoch"]
        saved_queue = checkpoint["queue"]  # (world, 2, rows, D) or None
        if saved_queue is not None and saved_queue.shape[:3] == (run.world, 2, rows):
            queue = EmbeddingQueue(rows, args.feat_dim).to(run.device)
            queue.embeddings.copy_(saved_queue[run.rank])
        elif saved_queue is not None:
            log(f"note: the saved queue was for {saved_queue.shape[0]} processes; starting an empty one")
        log(f"resumed from {checkpoint_path}: epoch {start_epoch}, step {start_step} of {iters_per_epoch}")
    else:
        log("arguments:\n" + training.format_args(args))

    def save(epoch, step_in_epoch):
        # Every rank's queue differs, so all ranks gather them (a collective: every rank calls
        # save) and rank 0 writes them into the one atomic checkpoint; rank r resumes from [r].
        queues = None if queue is None else training.concat_all_gather(queue.embeddings[None])
        if run.main:
            training.save_checkpoint(dict(
                method="swav", settings=training.resume_settings(args, run, extra_keys), args=vars(args),
                model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                queue=None if queues is None else queues.cpu(), epoch=epoch, step_in_epoch=step_in_epoch),
                checkpoint_path)

    json_log = training.JsonLog(args.output_dir, run)
    for epoch in range(start_epoch, args.epochs):
        # ============ one epoch of SwAV ============
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip_batches = start_step
        if queue is None and rows > 0 and epoch >= args.epoch_queue_starts:
            queue = EmbeddingQueue(rows, args.feat_dim).to(run.device)
            log(f"queue started: {rows} x {run.world} embeddings per global crop; used once full")
        model.train()
        progress = training.EpochProgress(args, run, epoch, start_step, iters_per_epoch, checkpoint_path)
        for i, (crops, _) in enumerate(loader, start=start_step):
            it = epoch * iters_per_epoch + i  # global iteration: index into the schedule
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule[it]
                group["weight_decay"] = args.weight_decay * group["wd_factor"]
            crops = [c.to(run.device, non_blocking=True, memory_format=memory_format) for c in crops]
            model.normalize_prototypes()  # before the forward, every iteration (spec §2.3)

            with training.autocast(run, args.amp):
                embeddings, scores = model_ddp(crops)
            # Codes and loss in float32 outside autocast (Sinkhorn's exp overflows in half precision).
            codes = assign_codes(scores.detach(), embeddings.detach(), model.prototypes.weight, queue,
                                 crops[0].shape[0], args.epsilon, args.sinkhorn_iterations)
            loss = swapped_prediction_loss(scores, codes, recipe.local_crops, alpha, beta, args.temperature)

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if epoch < args.freeze_prototypes_epochs:
                # None, not zero: LARS then skips them (no weight decay, no momentum). Counted in
                # epochs; a moving target early on is a known cause of collapse (spec §2.3).
                model.prototypes.weight.grad = None
            scaler.step(optimizer)
            scaler.update()

            if progress.update(it, lr_schedule[it], loss=loss):
                save(epoch, i + 1)

        # ============ end of epoch: log, monitor, checkpoint ============
        record = dict(epoch=epoch + 1, **progress.close(it), lr=lr_schedule[it], wd=args.weight_decay,
                      queue_active=queue is not None and queue.active)
        record.update(training.knn_eval_if_due(model.backbone, args, run, epoch))
        log(json.dumps(record))
        json_log.write(**record)
        save(epoch + 1, 0)
        start_step = 0

    if args.export and run.main:
        training.export_backbone(training.strip_prefix(model.state_dict(), "backbone."), args.export, args.arch)
    training.cleanup()
    return dict(model=model, queue=queue)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
