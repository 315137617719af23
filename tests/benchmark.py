"""Throughput and memory of the training step, of the input pipeline, and of both together, built
on what the method scripts expose (their model builders, losses, update functions and backend
settings); nothing in them is patched. Not collected by pytest.

    python tests/benchmark.py step --method dino --arch resnet18 --recipe light --batch-size 128
    python tests/benchmark.py step --method dino --arch vit_tiny --recipe baseline --local-crops 6
    python tests/benchmark.py step --method moco --arch mobilenet_v2 --compile
    python tests/benchmark.py data --data data/imagenette2-112/train --global-size 112 --workers 2
    python tests/benchmark.py train --data data/imagenette2-112/train --global-size 224 --workers 15

What each mode times (the `timed` field of every result says it again):
step:  forward + loss + backward + optimizer + the method's extras (DINO: teacher EMA and centre;
       MoCo: key EMA and queue; SwAV: Sinkhorn codes over a full queue) on fixed random crops
       already on the device; peak memory on CUDA. Also under torchrun (DDP, and SyncBN on CUDA, as
       the scripts run): the total img/s of all processes.
data:  JPEG on disk -> multi-crop views made by the loader processes (--views-on loader) or decoded
       images sampled into views on --device (--views-on device) -> normalised crops on the device;
       no step. Also the CPU ms per image in the loader processes and in the main one, and the MB
       per batch the loader ships.
train: end to end, JPEG on disk -> loss and update, as a script's loop runs (--prefetch 1: through
       views.Prefetcher; on CUDA the next batch's host-to-device copy runs beside the step).

Honest timing. Every mode first runs --warmup untimed steps; data and train add workers x 2
batches, those the loader makes in advance (prefetch factor 2, as the scripts), so that the timed
batches are made while the clock runs. The clock then starts on a synchronised device and runs
until at least --steps batches AND --min-seconds have passed (under torchrun rank 0 decides, every
10 steps, so that all processes run the same steps). A result gives the batches and seconds it
timed, and `first_step_s`: the first warm-up step alone (compilation, cuDNN autotuning, the
loader's start). Epochs cycle, so any number of batches works on a small data set. The backend
settings are the scripts' own (their resolve_amp: --amp auto, cudnn.benchmark, matmul precision).
--compile: torch.compile of the modules the step runs forward on, as the scripts' --compile.

The paper's throughput setting: batch 128 per GPU, 2x224 + 6x96 (baseline) or 6x128 (light),
ViT-Tiny 10 locals. DINO ViT-Tiny as the README's goal: --recipe baseline --local-crops 6
(2x224 + 6x96) with the 65,536-way head (--out-dim, the ViT default).
"""
import argparse
import importlib
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import backbones  # noqa: E402
import views  # noqa: E402

SCRIPTS = {"dino": "dino", "moco": "moco_v2", "swav": "swav"}
PREFETCH_FACTOR = 2  # the scripts' DataLoader setting
EXTRAS = {"dino": "teacher EMA, centre", "moco": "key EMA, queue",
          "swav": "Sinkhorn codes over a full queue"}
TIMED = {
    "step": "step: forward + loss + backward + optimizer + {extras}, on fixed random crops on the "
            "device",
    "data": "data: JPEG on disk -> loader ({views_on} views) -> normalised crops on the device, "
            "no step",
    "train": "train: JPEG on disk -> loader ({views_on} views) -> {prefetch}normalised crops -> "
             "the whole step ({extras}), as a script's loop",
}


def script(method):
    return importlib.import_module(SCRIPTS[method])


def ddp(module, world_size):
    return torch.nn.parallel.DistributedDataParallel(module) if world_size > 1 else module


def compiled(module, enabled):
    """torch.compile of a module the step calls forward on (its DDP wrapper if any), as the scripts'
    --compile: parameters, state dicts and the EMA stay those of the uncompiled module."""
    return torch.compile(module) if enabled else module


def placed(device, fmt, world_size):
    return lambda m: backbones.sync_batchnorm(m, device, world_size).to(device, memory_format=fmt)


def dino_step(arch, recipe, batch_size, device, fmt, world_size=1, out_dim=None, compile=False):
    """-> (step(crops, autocast, scaler), head): DINO's step as dino.py's loop runs it."""
    import dino
    defaults = dino.PAPER_DEFAULTS["vit" if backbones.is_vit(arch) else "cnn"]
    out_dim = out_dim or defaults["out_dim"]
    net = lambda drop_path: dino.build_dino_net(arch, out_dim, defaults["use_bn_in_head"],
                                                defaults["norm_last_layer"], drop_path)
    to_device = placed(device, fmt, world_size)
    student, teacher = to_device(net(defaults["drop_path"])), to_device(net(0.0))
    student_fwd = compiled(ddp(student, world_size), compile)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher_fwd = compiled(teacher, compile)
    loss_fn = dino.DINOLoss(out_dim, recipe.local_crops, *recipe.alpha_beta).to(device)
    groups = dino.param_groups([student])
    optimizer = dino.LARS(groups) if defaults["optimizer"] == "lars" else torch.optim.AdamW(
        groups, fused=device.type == "cuda")
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())

    def step(crops, autocast, scaler):
        with autocast:
            teacher_out = teacher_fwd(crops[:2])
            loss, _ = loss_fn(student_fwd(crops), teacher_out, 0.04)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        dino.ema_update(teacher_params, student_params, 0.996)
        loss_fn.update_center(teacher_out)
        return loss.detach()
    return step, f"K {out_dim}, {defaults['optimizer']}"


def moco_step(arch, recipe, batch_size, device, fmt, world_size=1, out_dim=None, compile=False):
    """MoCo's multi-crop step as moco_v2.py's loop runs it (keys: split-BN in one process, SyncBN or
    shuffle-BN across processes)."""
    import moco_v2
    if out_dim:
        raise ValueError("--out-dim is DINO's K or SwAV's prototypes; MoCo's embedding stays 128")
    query_encoder, key_encoder = (moco_v2.build_moco_net(arch, 128, 2048) for _ in range(2))
    to_device = placed(device, fmt, world_size)
    query_encoder, key_encoder = to_device(query_encoder), to_device(key_encoder)
    query_fwd = compiled(ddp(query_encoder, world_size), compile)
    key_encoder.load_state_dict(query_encoder.state_dict())
    key_encoder.requires_grad_(False)
    key_fwd = compiled(key_encoder, compile)
    queue = moco_v2.MoCoQueue(128, 65536).to(device)
    optimizer = moco_v2.LARS(moco_v2.param_groups([query_encoder]), lr=1e-4)
    is_type = lambda net, kind: any(isinstance(m, kind) for m in net.modules())
    key_bn = moco_v2.key_bn_mode(is_type(query_encoder, torch.nn.modules.batchnorm._BatchNorm),
                                 world_size, is_type(key_encoder, torch.nn.SyncBatchNorm))
    bn_splits = moco_v2.clamp_bn_splits(8, batch_size)
    query_params, key_params = list(query_encoder.parameters()), list(key_encoder.parameters())
    alpha, beta = recipe.alpha_beta

    def step(crops, autocast, scaler):
        moco_v2.ema_update(key_params, query_params, 0.999)
        with autocast:
            q, k = moco_v2.moco_forward(query_fwd, key_fwd, crops, key_bn, bn_splits)
        logits = moco_v2.moco_logits(q.float(), k.float(), queue.keys, 0.2)
        loss = moco_v2.moco_loss(logits, 1 + recipe.local_crops, alpha, beta)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        queue.enqueue(moco_v2.all_gather_cat(k))
        return loss.detach()
    return step, f"dim 128, hidden 2048, queue 65536, key BN {key_bn}"


def swav_step(arch, recipe, batch_size, device, fmt, world_size=1, out_dim=None, compile=False):
    """SwAV's step as swav.py's loop runs it once its queue is full (the slowest case; the
    paper's runs from epoch 15 of 200): the queue starts full of normalised random embeddings."""
    import swav
    prototypes = out_dim or 3000
    model = placed(device, fmt, world_size)(swav.build_swav_net(arch, num_prototypes=prototypes))
    model_fwd = compiled(ddp(model, world_size), compile)
    rows = swav.queue_rows(3840, batch_size, world_size)
    queue = swav.EmbeddingQueue(rows, 128).to(device)
    with torch.no_grad():
        queue.embeddings.copy_(F.normalize(torch.randn_like(queue.embeddings), dim=2))
    queue.filled = rows  # assign_codes stacks the queue in only once it is full()
    optimizer = swav.LARS(swav.param_groups([model]), lr=1e-4)
    alpha, beta = recipe.alpha_beta

    def step(crops, autocast, scaler):
        model.normalize_prototypes()
        with autocast:
            embeddings, scores = model_fwd(crops)
        codes = swav.assign_codes(scores.detach(), embeddings.detach(), model.prototypes.weight,
                                  queue, len(crops[0]))
        loss = swav.swapped_prediction_loss(scores, codes, recipe.local_crops, alpha, beta)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()
    return step, f"prototypes {prototypes}, hidden 4096, queue {rows} rows (full)"


STEPS = {"dino": dino_step, "moco": moco_step, "swav": swav_step}


def pick_device(name):
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def precision(method, amp, device):
    """-> (amp, autocast, GradScaler) as the scripts set them, through their resolve_amp (auto =
    bf16 on GPUs of compute capability >= 8.0, fp16 below, off on the CPU), which also sets
    cudnn.benchmark and the matmul precision."""
    amp, _ = script(method).resolve_amp(amp, device)
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    autocast = torch.autocast(device.type, dtype, enabled=amp != "off")
    return amp, autocast, torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(run, device, warmup, steps, min_seconds, on_start=lambda: None):
    """run() `warmup` times untimed, the first alone timed (compilation, cuDNN autotuning, the
    loader's start), then on the clock until >= steps runs and >= min_seconds. The clock starts and
    stops on a synchronised device. -> (the timing fields of a result, runs per second)."""
    start = time.perf_counter()
    run()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        run()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    on_start()
    batches, start = 0, time.perf_counter()
    # Under torchrun the processes must run the same steps (DDP's all-reduces pair up), so rank 0
    # decides when to stop, every 10 steps once --steps are done; one process checks every step.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    while True:
        run()
        batches += 1
        if batches < steps or (distributed and batches % 10):
            continue
        stop = time.perf_counter() - start >= min_seconds  # host time: no device sync here
        if distributed:
            flag = torch.tensor([float(stop)], device=device)
            torch.distributed.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            break
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    timing = dict(first_step_s=round(first, 2), warmup_batches=max(1, warmup), batches=batches,
                  seconds=round(seconds, 2), peak_memory_gib=peak and round(peak, 2))
    return timing, batches / seconds


def environment(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(device=name, torch=torch.__version__, cuda=torch.version.cuda,
                cpu_count=os.cpu_count(), threads=torch.get_num_threads())


def get_recipe(args):
    return views.get_recipe(args.method, args.recipe, backbones.is_vit(args.arch),
                            global_size=args.global_size, local_crops=args.local_crops,
                            local_size=getattr(args, "local_size", None))


def settings(args, recipe, amp, head=None):
    return dict(method=args.method, arch=args.arch, recipe=args.recipe,
                views=views.describe(recipe), batch_size=args.batch_size, amp=amp,
                compile=bool(getattr(args, "compile", False)), head=head)


def benchmark_step(args):
    """One process, or under torchrun every process with DDP (and SyncBN on CUDA), as the
    scripts run."""
    rank, world_size, device = script(args.method).init_distributed(args.device, 0)
    amp, autocast, scaler = precision(args.method, args.amp, device)
    recipe = get_recipe(args)
    fmt = {"auto": backbones.memory_format(args.arch, device), "channels_last": torch.channels_last,
           "contiguous": torch.contiguous_format}[args.memory_format]
    torch.manual_seed(0)
    step, head = STEPS[args.method](args.arch, recipe, args.batch_size, device, fmt, world_size,
                                    args.out_dim, args.compile)
    sizes = [recipe.global_size] * 2 + [recipe.local_size] * recipe.local_crops
    crops = [torch.randn(args.batch_size, 3, s, s, device=device).contiguous(memory_format=fmt)
             for s in sizes]
    timing, per_s = timed_loop(lambda: step(crops, autocast, scaler), device, args.warmup,
                               args.steps, args.min_seconds)
    return dict(mode="step", timed=TIMED["step"].format(extras=EXTRAS[args.method]),
                **settings(args, recipe, amp, head), memory_format=str(fmt).split(".")[-1],
                processes=world_size, **timing,
                img_per_s=round(per_s * args.batch_size * world_size, 1), **environment(device))


class TimedDataset(torch.utils.data.Dataset):
    """A data set whose items' CPU time (read, decode, transform) is added to a counter that the
    loader processes share."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.cpu_seconds = torch.zeros((), dtype=torch.float64).share_memory_()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        start = time.process_time()
        item = self.dataset[index]
        self.cpu_seconds += time.process_time() - start
        return item


def build_loader(args, device):
    """The scripts' input path: -> (recipe, the loader over a TimedDataset, the device sampler or
    None, an endless stream of batches: epoch after epoch, through views.Prefetcher with
    --prefetch 1). Persistent workers as the scripts, so an epoch's end costs what it costs them."""
    recipe = get_recipe(args)
    worker_transform, collate, sampler = views.view_pipeline(recipe, args.views_on)
    dataset = TimedDataset(views.build_dataset(args.data, worker_transform))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, pin_memory=device.type == "cuda", collate_fn=collate,
        persistent_workers=args.workers > 0,
        prefetch_factor=PREFETCH_FACTOR if args.workers else None)
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images make no batch of {args.batch_size}")
    epoch = views.Prefetcher(loader, device) if args.prefetch else loader
    return recipe, loader, sampler, (batch for _ in itertools.count() for batch in epoch)


def loader_warmup(args):
    """Untimed batches: --warmup, plus what the loader made in advance while the step warmed up."""
    return args.warmup + args.workers * PREFETCH_FACTOR


def loader_settings(args):
    return dict(data=args.data, views_on=args.views_on, prefetch=args.prefetch,
                workers=args.workers)


def benchmark_data(args):
    device = pick_device(args.device)
    amp, _, _ = precision(args.method, args.amp, device)
    fmt = backbones.memory_format(args.arch, device)
    recipe, loader, sampler, batches = build_loader(args, device)
    dataset, last, cpu = loader.dataset, {}, {}

    def run():
        last["batch"] = next(batches)
        last["crops"] = views.batch_to_crops(last["batch"], device, fmt, sampler)

    def start_counters():  # the CPU counters cover the timed batches only
        dataset.cpu_seconds.zero_()
        cpu["main"] = time.process_time()

    timing, per_s = timed_loop(run, device, loader_warmup(args), args.steps, args.min_seconds,
                               start_counters)
    main_cpu = time.process_time() - cpu["main"]
    images = timing["batches"] * args.batch_size
    batch, crops = last["batch"], last["crops"]
    # What the workers ship, uint8: the decoded images, or every crop.
    shipped = batch[0] if sampler else torch.cat([c.flatten() for c in batch[0]])
    return dict(mode="data", timed=TIMED["data"].format(views_on=args.views_on),
                **settings(args, recipe, amp), **loader_settings(args), **timing,
                img_per_s=round(per_s * args.batch_size, 1),
                worker_cpu_ms_per_image=round(1000 * dataset.cpu_seconds.item() / images, 1),
                main_process_cpu_ms_per_image=round(1000 * main_cpu / images, 1),
                batch_mb_shipped_uint8=round(shipped.numel() / 2**20, 2),
                batch_mb_crops_float32=round(4 * sum(c.numel() for c in crops) / 2**20, 2),
                **environment(device))


def benchmark_train(args):
    """End to end in one process, as a script's loop runs: JPEG on disk -> loader -> (Prefetcher:
    the next batch's copy beside this step on CUDA) -> normalised crops or device-sampled views ->
    the step."""
    device = pick_device(args.device)
    amp, autocast, scaler = precision(args.method, args.amp, device)
    fmt = backbones.memory_format(args.arch, device)
    recipe, loader, sampler, batches = build_loader(args, device)
    torch.manual_seed(0)
    step, head = STEPS[args.method](args.arch, recipe, args.batch_size, device, fmt, 1,
                                    args.out_dim, args.compile)
    run = lambda: step(views.batch_to_crops(next(batches), device, fmt, sampler), autocast, scaler)
    timing, per_s = timed_loop(run, device, loader_warmup(args), args.steps, args.min_seconds)
    timed = TIMED["train"].format(views_on=args.views_on, extras=EXTRAS[args.method],
                                  prefetch="Prefetcher -> " if args.prefetch else "")
    return dict(mode="train", timed=timed, **settings(args, recipe, amp, head),
                **loader_settings(args), memory_format=str(fmt).split(".")[-1], **timing,
                img_per_s=round(per_s * args.batch_size, 1), **environment(device))


MODES = {"step": benchmark_step, "data": benchmark_data, "train": benchmark_train}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("mode", choices=sorted(MODES))
    add("--method", default="dino", choices=sorted(SCRIPTS))
    add("--arch", default="resnet18", choices=backbones.ARCHS)
    add("--recipe", default="light",
        help="light (2x224 + 6x128) or baseline (2x224 + 6x96); ViT-Tiny: 10 locals")
    add("--batch-size", type=int, default=128, help="per process")
    add("--global-size", type=int, default=None, help="224 (the local size follows)")
    add("--local-size", type=int, default=None,
        help="default: light 128, baseline 96 at 224 px, scaled with --global-size")
    add("--local-crops", type=int, default=None, help="6 for CNNs, 10 for ViT-Tiny in the paper")
    add("--out-dim", type=int, default=None,
        help="step, train: DINO's K (the paper's: CNN 4096, ViT 65536) or SwAV's prototypes (3000)")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
        help="the scripts' rule: auto = bf16 on CUDA (fp16 below compute capability 8.0), off on "
             "the CPU; an explicit value holds on the CPU too")
    add("--compile", action="store_true",
        help="step, train: torch.compile the networks the step runs forward on (as the scripts)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
        help="step mode: auto = backbones.memory_format (what the scripts use)")
    add("--steps", type=int, default=100, help="at least this many timed batches")
    add("--min-seconds", type=float, default=5.0, help="and at least this many timed seconds")
    add("--warmup", type=int, default=5,
        help="untimed steps first (>= 1); data, train: plus workers x 2 batches")
    add("--data", default="synthetic", help="data, train: " + views.DATA_HELP)
    add("--views-on", default="loader", choices=["loader", "device"],
        help="data, train: views made by the loader processes (PIL) or sampled on --device")
    add("--workers", type=int, default=os.cpu_count(), help="data, train: loader processes")
    add("--prefetch", type=int, choices=[0, 1], default=1,
        help="data, train: 1 = through views.Prefetcher, as the scripts (CUDA: copy on a side "
             "stream)")
    add("--json", default=None, help="also append the result as one JSON line to this file")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    result = MODES[args.mode](args)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 reports
        return result
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
