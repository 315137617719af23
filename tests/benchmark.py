"""Throughput and memory of the training step, and of the input pipeline, built on what the method scripts
expose (their model builders, losses and update functions); nothing in them is patched. Not collected by pytest.

    python tests/benchmark.py step --method dino --arch resnet18 --recipe light --batch-size 128
    python tests/benchmark.py step --method moco --arch mobilenet_v2 --amp bf16
    python tests/benchmark.py data --data data/imagenette2-112/train --global-size 112 --workers 2
    python tests/benchmark.py train --data data/imagenette2-112/train --global-size 224 --workers 16 --amp bf16

step: one training step on fixed random crops already on the device (forward, loss, backward, optimizer,
EMA / queue / centre), timed over --steps after --warmup steps; img/s and, on CUDA, peak memory.
data: JPEG on disk -> the multi-crop views through the DataLoader (--views-on loader) or decoded images
sampled into views on --device (--views-on device) -> normalised crops on the device: img/s, CPU ms per
image in the loader processes and in the main one, the MB per batch the loader ships (uint8) and the MB of
the float32 crops it becomes.
train: end to end in one process, JPEG on disk -> loss, as a script's loop runs (with --prefetch 1, through
views.Prefetcher: on CUDA the next batch's host-to-device copy runs on a side stream beside the step).
The paper's throughput setting: batch 128 per GPU, 2x224 + 6x96 (baseline) or 6x128 (light); ViT-Tiny 10 locals.
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import backbones  # noqa: E402
import views  # noqa: E402


def ddp(module, world_size):
    return torch.nn.parallel.DistributedDataParallel(module) if world_size > 1 else module


def dino_step(arch, recipe, batch_size, device, fmt, world_size=1):
    """-> step(crops, autocast, scaler): DINO's step as dino.py's loop runs it."""
    import dino
    defaults = dino.PAPER_DEFAULTS["vit" if backbones.is_vit(arch) else "cnn"]
    student = dino.build_dino_net(arch, defaults["out_dim"], defaults["use_bn_in_head"], defaults["norm_last_layer"],
                                  defaults["drop_path"])
    teacher = dino.build_dino_net(arch, defaults["out_dim"], defaults["use_bn_in_head"], defaults["norm_last_layer"])
    to_device = lambda net: backbones.sync_batchnorm(net, device, world_size).to(device, memory_format=fmt)
    student, teacher = to_device(student), to_device(teacher)
    student_ddp = ddp(student, world_size)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = dino.DINOLoss(defaults["out_dim"], recipe.local_crops, *recipe.alpha_beta).to(device)
    groups = dino.param_groups([student])
    optimizer = dino.LARS(groups) if defaults["optimizer"] == "lars" else torch.optim.AdamW(
        groups, fused=device.type == "cuda")
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())

    def step(crops, autocast, scaler):
        with autocast:
            teacher_out = teacher(crops[:2])
            loss, _ = loss_fn(student_ddp(crops), teacher_out, 0.04)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        dino.ema_update(teacher_params, student_params, 0.996)
        loss_fn.update_center(teacher_out)
        return loss.detach()
    return step


def moco_step(arch, recipe, batch_size, device, fmt, world_size=1):
    """MoCo's multi-crop step as moco_v2.py's loop runs it (keys: split-BN in one process, SyncBN or shuffle-BN
    across processes)."""
    import moco_v2
    query_encoder, key_encoder = (moco_v2.build_moco_net(arch, 128, 2048) for _ in range(2))
    to_device = lambda net: backbones.sync_batchnorm(net, device, world_size).to(device, memory_format=fmt)
    query_encoder, key_encoder = to_device(query_encoder), to_device(key_encoder)
    query_ddp = ddp(query_encoder, world_size)
    key_encoder.load_state_dict(query_encoder.state_dict())
    key_encoder.requires_grad_(False)
    queue = moco_v2.MoCoQueue(128, 65536).to(device)
    optimizer = moco_v2.LARS(moco_v2.param_groups([query_encoder]), lr=1e-4)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in query_encoder.modules())
    key_bn = moco_v2.key_bn_mode(has_bn, world_size, any(isinstance(m, torch.nn.SyncBatchNorm)
                                                         for m in key_encoder.modules()))
    bn_splits = moco_v2.clamp_bn_splits(8, batch_size)
    query_params, key_params = list(query_encoder.parameters()), list(key_encoder.parameters())
    alpha, beta = recipe.alpha_beta

    def step(crops, autocast, scaler):
        moco_v2.ema_update(key_params, query_params, 0.999)
        with autocast:
            q, k = moco_v2.moco_forward(query_ddp, key_encoder, crops, key_bn, bn_splits)
        logits = moco_v2.moco_logits(q.float(), k.float(), queue.keys, 0.2)
        loss = moco_v2.moco_loss(logits, 1 + recipe.local_crops, alpha, beta)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        queue.enqueue(moco_v2.all_gather_cat(k))
        return loss.detach()
    return step


def swav_step(arch, recipe, batch_size, device, fmt, world_size=1):
    """SwAV's step as swav.py's loop runs it (the queue full from the start: the slowest case)."""
    import swav
    model = backbones.sync_batchnorm(swav.build_swav_net(arch), device, world_size).to(device, memory_format=fmt)
    model_ddp = ddp(model, world_size)
    queue = swav.EmbeddingQueue(swav.queue_rows(3840, batch_size, 1), 128).to(device)
    queue.embeddings.normal_()
    optimizer = swav.LARS(swav.param_groups([model]), lr=1e-4)
    alpha, beta = recipe.alpha_beta

    def step(crops, autocast, scaler):
        model.normalize_prototypes()
        with autocast:
            embeddings, scores = model_ddp(crops)
        codes = swav.assign_codes(scores.detach(), embeddings.detach(), model.prototypes.weight, queue, len(crops[0]))
        loss = swav.swapped_prediction_loss(scores, codes, recipe.local_crops, alpha, beta)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()
    return step


STEPS = {"dino": dino_step, "moco": moco_step, "swav": swav_step}


def pick_device(name):
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def precision(amp, device):
    """-> (amp, autocast, GradScaler) as the scripts use them; bf16 means off on the CPU."""
    amp = amp if device.type == "cuda" or amp != "bf16" else "off"
    autocast = torch.autocast(device.type, torch.float16 if amp == "fp16" else torch.bfloat16, enabled=amp != "off")
    return amp, autocast, torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def benchmark_step(args):
    """One process, or under torchrun every process with DDP (and SyncBN on CUDA), as the scripts run."""
    import dino  # for its copy of the plumbing's init_distributed
    rank, world_size, device = dino.init_distributed(args.device, 0)
    amp, autocast, scaler = precision(args.amp, device)
    recipe = views.get_recipe(args.method, args.recipe, backbones.is_vit(args.arch), global_size=args.global_size,
                              local_crops=args.local_crops)
    fmt = {"auto": backbones.memory_format(args.arch, device), "channels_last": torch.channels_last,
           "contiguous": torch.contiguous_format}[args.memory_format]
    torch.manual_seed(0)
    step = STEPS[args.method](args.arch, recipe, args.batch_size, device, fmt, world_size)
    sizes = [recipe.global_size] * 2 + [recipe.local_size] * recipe.local_crops
    crops = [torch.randn(args.batch_size, 3, s, s, device=device).contiguous(memory_format=fmt) for s in sizes]
    for _ in range(args.warmup):  # cuDNN autotuning, the allocator
        step(crops, autocast, scaler)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(args.steps):
        loss = step(crops, autocast, scaler)
    loss.item()  # waits for the device
    elapsed = time.time() - start
    return dict(mode="step", method=args.method, arch=args.arch, recipe=args.recipe, views=views.describe(recipe),
                batch_size=args.batch_size, amp=amp, steps=args.steps, threads=torch.get_num_threads(),
                memory_format=str(fmt).split(".")[-1],
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                processes=world_size, img_per_s=round(args.steps * args.batch_size * world_size / elapsed, 1),
                peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
                torch=torch.__version__)


class TimedDataset(torch.utils.data.Dataset):
    """A data set whose items' CPU time (read, decode, transform) is added to a counter that the loader
    processes share."""

    def __init__(self, dataset):
        self.dataset, self.cpu_seconds = dataset, torch.zeros((), dtype=torch.float64).share_memory_()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        start = time.process_time()
        item = self.dataset[index]
        self.cpu_seconds += time.process_time() - start
        return item


def build_loader(args, device):
    """The scripts' input path: -> (recipe, the loader over a TimedDataset, the device sampler or None)."""
    recipe = views.get_recipe(args.method, args.recipe, backbones.is_vit(args.arch), global_size=args.global_size,
                              local_crops=args.local_crops)
    worker_transform, collate, sampler = views.view_pipeline(recipe, args.views_on)
    dataset = TimedDataset(views.build_dataset(args.data, worker_transform))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         collate_fn=collate, prefetch_factor=2 if args.workers else None)
    return recipe, loader, sampler


def benchmark_data(args):
    device = pick_device(args.device)
    recipe, loader, sampler = build_loader(args, device)
    dataset = loader.dataset
    batches = iter(loader)
    for _ in range(args.warmup):
        next(batches)
    dataset.cpu_seconds.zero_()
    start, main_cpu = time.time(), time.process_time()
    for _ in range(args.steps):
        batch = next(batches)
        crops = views.batch_to_crops(batch, device, sampler=sampler)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed, main_cpu = time.time() - start, time.process_time() - main_cpu
    images = args.steps * args.batch_size
    shipped = batch[0] if sampler else torch.cat([c.flatten() for c in batch[0]])  # what the workers send, uint8
    return dict(mode="data", data=args.data, method=args.method, recipe=args.recipe, views=views.describe(recipe),
                batch_size=args.batch_size, workers=args.workers, cpu_count=os.cpu_count(),
                img_per_s=round(images / elapsed, 1),
                views_on=args.views_on, worker_cpu_ms_per_image=round(1000 * dataset.cpu_seconds.item() / images, 1),
                main_process_cpu_ms_per_image=round(1000 * main_cpu / images, 1),
                batch_mb_shipped_uint8=round(shipped.numel() / 2**20, 2),
                batch_mb_crops_float32=round(4 * sum(c.numel() for c in crops) / 2**20, 2),
                device=str(device), torch=torch.__version__)


def benchmark_train(args):
    """End to end in one process, as a script's loop runs: JPEG on disk -> loader -> (Prefetcher: the next
    batch's copy beside this step on CUDA) -> normalised crops or device-sampled views -> the step."""
    device = pick_device(args.device)
    amp, autocast, scaler = precision(args.amp, device)
    fmt = backbones.memory_format(args.arch, device)
    recipe, loader, sampler = build_loader(args, device)
    torch.manual_seed(0)
    step = STEPS[args.method](args.arch, recipe, args.batch_size, device, fmt)
    epoch = views.Prefetcher(loader, device) if args.prefetch else loader
    batches = (batch for _ in itertools.count() for batch in epoch)  # epoch after epoch, as long as asked
    run = lambda: step(views.batch_to_crops(next(batches), device, fmt, sampler), autocast, scaler)
    for _ in range(args.warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(args.steps):
        loss = run()
    loss.item()  # waits for the device
    elapsed = time.time() - start
    return dict(mode="train", data=args.data, method=args.method, arch=args.arch, recipe=args.recipe,
                views=views.describe(recipe), views_on=args.views_on, prefetch=args.prefetch,
                batch_size=args.batch_size, workers=args.workers, amp=amp, steps=args.steps,
                memory_format=str(fmt).split(".")[-1], cpu_count=os.cpu_count(),
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                img_per_s=round(args.steps * args.batch_size / elapsed, 1),
                peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
                torch=torch.__version__)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["step", "data", "train"])
    parser.add_argument("--method", default="dino", choices=["dino", "moco", "swav"])
    parser.add_argument("--arch", default="resnet18", choices=backbones.ARCHS)
    parser.add_argument("--recipe", default="light", help="light (2x224 + 6x128) or baseline (2x224 + 6x96)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--global-size", type=int, default=None, help="224 (the local size follows)")
    parser.add_argument("--local-crops", type=int, default=None, help="6 for CNNs, 10 for ViT-Tiny in the paper")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"], help="bf16 means off on the CPU")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                        help="step mode: auto = backbones.memory_format (what the scripts use)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps / batches")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps / batches first")
    parser.add_argument("--data", default="synthetic", help="data, train: " + views.DATA_HELP)
    parser.add_argument("--views-on", default="loader", choices=["loader", "device"],
                        help="data, train: views made by the loader processes (PIL) or sampled on --device in batches")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="data, train: loader processes")
    parser.add_argument("--prefetch", type=int, choices=[0, 1], default=1,
                        help="train mode: 1 = through views.Prefetcher as the scripts (CUDA: copy on a side stream)")
    parser.add_argument("--json", default=None, help="also append the result as one JSON line to this file")
    args = parser.parse_args()
    result = {"step": benchmark_step, "data": benchmark_data, "train": benchmark_train}[args.mode](args)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 reports
        sys.exit(0)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
