"""Throughput and memory of the training step, of the input pipeline, and of both together, built
on what the method scripts expose (their model builders, losses, update functions and backend
settings); nothing in them is patched. Not collected by pytest.

    python tests/benchmark.py step --method dino --arch resnet18 --recipe light --batch-size 128
    python tests/benchmark.py step --method dino --arch vit_tiny --recipe baseline --local-crops 6
    python tests/benchmark.py step --method moco --arch mobilenet_v2 --compile
    python tests/benchmark.py data --make-data 2000 --workers 0 --device cuda
    python tests/benchmark.py data --data data/imagenette2-112/train --global-size 112 --workers 2
    python tests/benchmark.py train --make-data 2000 --workers 15 --views-on device

What each mode times (the `timed` field of every result says it again):
step:  forward + loss + backward + optimizer + the method's extras (DINO: teacher EMA and centre;
       MoCo: key EMA and queue; SwAV: Sinkhorn codes over a full queue) on fixed random crops
       already on the device; peak memory on CUDA. Also under torchrun (DDP, and SyncBN on CUDA, as
       the scripts run): the total img/s of all processes.
data:  per input path (--views-on loader: PIL views in the loader processes; device: the loader
       decodes, the sampler makes the views on --device; default both), the CPU ms per image of
       the loader's parts, measured in this process on one thread as a loader process runs
       (decode, views / resize, to-tensor, collate), the img/s that 15 loader processes would
       make from it, and the main process's ms per image beside it (batch_to_crops on --device:
       on a GPU machine the device path's views move there). With --workers N > 0 also the
       loader at work: JPEG on disk -> N loader processes -> normalised crops on the device, no
       step; the CPU ms per image in the loader processes and in the main one, and the MB per
       batch the loader ships.
train: end to end, JPEG on disk -> loss and update, as a script's loop runs (--prefetch 1: through
       views.Prefetcher; on CUDA the next batch's host-to-device copy runs beside the step).
--make-data N: N ImageNet-sized JPEGs (make_imagenet_like: ImageNet's mix of sizes, ~2 % over
       1,500 px, quality 90-96, ~120 KB each) generated first; the result's image_set gives the
       count, the mix of sizes and the mean file size of whatever set was read.

Honest timing. Every mode first runs untimed: step --warmup steps, data and train whole epochs
(at least one, and --warmup batches). The clock then starts on a synchronised device and runs
until at least --steps batches AND --min-seconds have passed; data and train start it at an epoch
boundary, where the loader holds no batch made in advance, and stop it at an epoch's end, so that
each epoch's start is paid as in training (step under torchrun: rank 0 decides, every 10 steps,
so that all processes run the same steps). A result gives the batches (and epochs) and seconds it
timed, and `first_step_s`: the first warm-up step alone (compilation, cuDNN autotuning, the
loader's start). The backend settings are the scripts' own (their resolve_amp: --amp auto,
cudnn.benchmark, matmul precision). --compile: torch.compile of the modules the step runs forward
on, as the scripts' --compile.

The paper's throughput setting: batch 128 per GPU, 2x224 + 6x96 (baseline) or 6x128 (light),
ViT-Tiny 10 locals. DINO ViT-Tiny as the README's target: --recipe baseline --local-crops 6
(2x224 + 6x96) with the 65,536-way head (--out-dim, the ViT default).
"""
import argparse
import concurrent.futures
import importlib
import json
import os
import random
import shutil
import sys
import tempfile
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
    "data": "data, per image: the CPU ms of the loader's parts (the data set's items and "
            "collate_fn, in this process on one thread, as a loader process) and of the main "
            "process's batch_to_crops on {device}; projected img/s = {loaders} loaders x 1000 / "
            "loader ms. loader_run: JPEG on disk -> --workers loaders -> crops on the device, no "
            "step, whole epochs",
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


# ---------------------------------------------------------------------------------------------
# An ImageNet-sized JPEG set, generated: ImageNet's input cost comes from its sizes and file sizes
# ---------------------------------------------------------------------------------------------

def oriented(rng, longer, ratio):
    """(width, height) of a side `longer` and aspect `ratio`, landscape 3 times in 4."""
    size = (longer, round(longer / ratio))
    return size if rng.random() < 0.75 else size[::-1]


# ImageNet train's sizes, approximately: most 500 x 375 or 375 x 500, then 500 x 333 and 500 x 500,
# smaller ones, and ~2 % over 1,500 px on the longer side (up to ~2,600 x 3,900), which set the
# worst case of a decode. (name, share, rng -> (width, height)); every set holds each share.
IMAGENET_SIZE_MIX = [
    ("500x375", 0.46, lambda rng: (500, 375)),
    ("375x500", 0.16, lambda rng: (375, 500)),
    ("500x333", 0.12, lambda rng: (500, 333)),
    ("333x500", 0.04, lambda rng: (333, 500)),
    ("500x500", 0.06, lambda rng: (500, 500)),
    ("smaller", 0.14, lambda rng: oriented(rng, rng.randrange(150, 500), 4 / 3)),
    ("over 1500 px", 0.02, lambda rng: oriented(rng, rng.randrange(1500, 3901), 3 / 2)),
]
PROJECTED_LOADERS = 15  # a 16-core GPU machine: 15 loader processes, one core for the main one


def photo_like(width, height, seed):
    """An image whose JPEG costs what a photo's does: smooth random colour fields at 5 scales
    (sky, objects, texture), a few flat shapes with hard edges, and mild pixel noise. Flat colours
    decode too fast and pure noise too slow: this gives ~100 KB at 500 x 375, quality 93. The
    content is made at <= 640 px and upsized, so that a 10-megapixel image costs ~0.5 s."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    scale = min(1.0, 640 / max(width, height))
    w, h = round(width * scale), round(height * scale)
    x = (torch.rand(3, 1, 1, generator=generator) * 130 + 60).expand(3, h, w).clone()
    for cells, amplitude in ((3, 60), (10, 35), (40, 22), (160, 14), (max(w, h) // 2, 10)):
        grid = (max(2, cells * h // max(w, h)), max(2, cells * w // max(w, h)))
        noise = torch.randn(1, 3, *grid, generator=generator) * amplitude
        x += F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0]
    image = Image.fromarray(x.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(3, 9)):
        left, top, side = rng.randrange(w), rng.randrange(h), rng.randrange(2 + min(w, h) // 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([left, top, left + side, top + side], fill=tuple(rng.randrange(256) for _ in "rgb"))
    if scale < 1:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image)).short()
    pixels += (torch.randn(height, width, 1, generator=generator) * 5).short()
    return Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy())


def write_photos(jobs):
    torch.set_num_threads(1)  # one process per core
    for path, (width, height), quality, seed in jobs:
        photo_like(width, height, seed).save(path, quality=quality)


def make_imagenet_like(root, num_images, classes=10, seed=0, workers=1):
    """num_images JPEGs of ImageNet's sizes (IMAGENET_SIZE_MIX) and qualities (90-96) in
    root/train/<class>/*.JPEG, the same files for any `workers` (processes). -> root."""
    rng = random.Random(seed)
    counts = [round(share * num_images) for _, share, _ in IMAGENET_SIZE_MIX]
    counts[0] += num_images - sum(counts)  # what the shares leave: the most common size
    sizes = [size(rng) for (_, _, size), n in zip(IMAGENET_SIZE_MIX, counts) for _ in range(n)]
    rng.shuffle(sizes)
    jobs = []
    for i, size in enumerate(sizes):
        folder = os.path.join(root, "train", f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"{i:07d}.JPEG"), size, rng.randint(90, 96),
                     seed * 1_000_003 + i))
    if workers <= 1:
        write_photos(jobs)
        return root
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_photos, [jobs[k::workers] for k in range(workers)]))
    return root


def describe_images(data):
    """An image folder's count, mean file size and mix of sizes (from the headers), or its name."""
    if not os.path.isdir(data):
        return dict(name=data)
    from PIL import Image
    sizes, kb = [], []
    for folder, _, files in os.walk(data, followlinks=True):
        for name in files:
            if name.lower().endswith(views.IMAGE_EXTENSIONS):
                path = os.path.join(folder, name)
                with Image.open(path) as image:
                    sizes.append(image.size)
                kb.append(os.path.getsize(path) / 1024)
    if not sizes:
        return dict(name=data, count=0)
    longer = [max(size) for size in sizes]
    buckets = {"<500": lambda s: s < 500, "500": lambda s: s == 500,
               "501-1500": lambda s: 500 < s <= 1500, ">1500": lambda s: s > 1500}
    largest = max(sizes, key=lambda size: size[0] * size[1])
    return dict(count=len(sizes), mean_kb=round(sum(kb) / len(kb), 1),
                longer_side_px={k: sum(map(test, longer)) for k, test in buckets.items()},
                portrait=sum(w < h for w, h in sizes), largest=f"{largest[0]}x{largest[1]}")


# ---------------------------------------------------------------------------------------------
# The input path's costs, and the loader at work
# ---------------------------------------------------------------------------------------------

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


class TimedTransform:
    """A data set's transform, its CPU seconds summed. Other attributes are the transform's, so a
    data set that asks its transform how large an image it needs gets the same answer."""

    def __init__(self, transform):
        self.transform, self.seconds = transform, 0.0

    def __getattr__(self, name):
        if name == "transform":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.transform, name)

    def __call__(self, image):
        start = time.process_time()
        out = self.transform(image)
        self.seconds += time.process_time() - start
        return out


def to_tensor_seconds(output):
    """CPU seconds of TF.pil_to_tensor on PIL copies of a transform's uint8 images: the to-tensor
    part of its time, measured again apart (it runs inside the transform, view by view)."""
    import torchvision.transforms.functional as TF
    if isinstance(output, (list, tuple)):
        return sum(to_tensor_seconds(part) for part in output)
    if not (isinstance(output, torch.Tensor) and output.dtype == torch.uint8 and output.ndim == 3):
        return 0.0
    image = TF.to_pil_image(output)
    start = time.process_time()
    TF.pil_to_tensor(image)
    return time.process_time() - start


def input_costs(data, recipe, views_on, num_images, batch_size, device, fmt, seed=0):
    """CPU ms per image of each part of one input path, in this process: the loader's part (the
    data set's items and collate_fn) on one thread, as in a DataLoader worker, and the main
    process's batch_to_crops (normalise; or the device sampler) on `device`, over num_images
    images drawn at random. decode = an item's time outside its transform (open, draft, load);
    views / resize = the transform less to-tensor; to-tensor = TF.pil_to_tensor timed apart."""
    transform, collate, sampler = views.view_pipeline(recipe, views_on)
    timed = TimedTransform(transform)
    dataset = views.build_dataset(data, timed)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    items, batches, item_s, to_tensor_s, collate_s = [], [], 0.0, 0.0, 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for index in order[:num_images].tolist():
            start = time.process_time()
            items.append(dataset[index])
            item_s += time.process_time() - start
            to_tensor_s += to_tensor_seconds(items[-1][0])
        for k in range(0, len(items), batch_size):
            start = time.process_time()
            batches.append((collate or torch.utils.data.default_collate)(items[k:k + batch_size]))
            collate_s += time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    views.batch_to_crops(batches[0], device, fmt, sampler)  # untimed: first-call costs
    synchronize(device)
    start = time.process_time()
    for batch in batches:
        views.batch_to_crops(batch, device, fmt, sampler)
    synchronize(device)
    main_s = time.process_time() - start
    ms = lambda seconds: round(1000 * seconds / len(items), 2)
    loader_ms = ms(item_s + collate_s)
    return dict(images=len(items), transform=type(transform).__name__,
                loader_cpu_ms_per_image=loader_ms,
                loader_split_ms=dict(decode=ms(item_s - timed.seconds),
                                     views_or_resize=ms(timed.seconds - to_tensor_s),
                                     to_tensor=ms(to_tensor_s), collate=ms(collate_s)),
                projected_img_per_s=round(PROJECTED_LOADERS * 1000 / loader_ms, 1),
                main_process_cpu_ms_per_image=ms(main_s), main_process_on=device.type)


def build_loader(args, views_on, device):
    """The scripts' input path: -> (the loader over a TimedDataset, the device sampler or None,
    one epoch per iteration: through views.Prefetcher with --prefetch 1). Persistent workers as
    the scripts, so an epoch's end costs what it costs them."""
    worker_transform, collate, sampler = views.view_pipeline(get_recipe(args), views_on)
    dataset = TimedDataset(views.build_dataset(args.data, worker_transform))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, pin_memory=device.type == "cuda", collate_fn=collate,
        persistent_workers=args.workers > 0,
        prefetch_factor=PREFETCH_FACTOR if args.workers else None)
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images make no batch of {args.batch_size}")
    return loader, sampler, views.Prefetcher(loader, device) if args.prefetch else loader


def timed_epochs(epoch, run, device, warmup, steps, min_seconds, on_start=lambda: None):
    """run(batch) over whole epochs (one iteration of `epoch`). Untimed first: whole epochs, at
    least one, until >= warmup batches (the first batch alone timed: the loader's start,
    compilation, cuDNN autotuning). The clock then starts at an epoch boundary on a synchronised
    device, where the loader holds no batch (persistent workers start an epoch's batches when its
    first is asked for, so none made in advance inflates the rate), and stops at an epoch's end
    (each epoch's start, its workers' first batches, is paid as often as in training), once
    >= steps batches and >= min_seconds. -> (the timing fields of a result, batches per second)."""
    start, done, first = time.perf_counter(), 0, None
    while first is None or done < warmup:
        for batch in epoch:
            run(batch)
            done += 1
            if first is None:
                synchronize(device)
                first = time.perf_counter() - start
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    on_start()
    batches, epochs, start = 0, 0, time.perf_counter()
    while batches < steps or time.perf_counter() - start < min_seconds:
        for batch in epoch:
            run(batch)
            batches += 1
        epochs += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    timing = dict(first_step_s=round(first, 2), warmup_batches=done, epochs=epochs,
                  batches=batches, seconds=round(seconds, 2),
                  peak_memory_gib=peak and round(peak, 2))
    return timing, batches / seconds


def loader_run(args, views_on, device, fmt):
    """The loader at work: --workers processes -> batch_to_crops on the device, no step, timed
    over whole epochs; the CPU seconds of the workers (their items) and of the main process."""
    loader, sampler, epoch = build_loader(args, views_on, device)
    dataset, last, cpu = loader.dataset, {}, {}

    def run(batch):
        last["batch"], last["crops"] = batch, views.batch_to_crops(batch, device, fmt, sampler)

    def start_counters():  # the CPU counters cover the timed batches only
        dataset.cpu_seconds.zero_()
        cpu["main"] = time.process_time()

    timing, per_s = timed_epochs(epoch, run, device, args.warmup, args.steps, args.min_seconds,
                                 start_counters)
    main_cpu = time.process_time() - cpu["main"]
    images = timing["batches"] * args.batch_size
    batch, crops = last["batch"], last["crops"]
    # What the workers ship, uint8: the decoded images, or every crop.
    shipped = batch[0] if sampler else torch.cat([c.flatten() for c in batch[0]])
    return dict(workers=args.workers, prefetch=args.prefetch, **timing,
                img_per_s=round(per_s * args.batch_size, 1),
                worker_cpu_ms_per_image=round(1000 * dataset.cpu_seconds.item() / images, 1),
                main_process_cpu_ms_per_image=round(1000 * main_cpu / images, 1),
                batch_mb_shipped_uint8=round(shipped.numel() / 2**20, 2),
                batch_mb_crops_float32=round(4 * sum(c.numel() for c in crops) / 2**20, 2))


def benchmark_data(args):
    """Per input path: input_costs (in this process), and with --workers the loader at work."""
    device = pick_device(args.device)
    amp, _, _ = precision(args.method, args.amp, device)
    fmt = backbones.memory_format(args.arch, device)
    recipe = get_recipe(args)
    paths = {}
    for views_on in ["loader", "device"] if args.views_on == "both" else [args.views_on]:
        paths[views_on] = input_costs(args.data, recipe, views_on, args.profile_images,
                                      args.batch_size, device, fmt)
        if args.workers:
            paths[views_on]["loader_run"] = loader_run(args, views_on, device, fmt)
    return dict(mode="data", timed=TIMED["data"].format(device=device.type,
                                                        loaders=PROJECTED_LOADERS),
                **settings(args, recipe, amp), data=args.data, image_set=describe_images(args.data),
                paths=paths, **environment(device))


def benchmark_train(args):
    """End to end in one process, as a script's loop runs: JPEG on disk -> loader -> (Prefetcher:
    the next batch's copy beside this step on CUDA) -> normalised crops or device-sampled views ->
    the step, over whole epochs."""
    device = pick_device(args.device)
    amp, autocast, scaler = precision(args.method, args.amp, device)
    fmt = backbones.memory_format(args.arch, device)
    recipe = get_recipe(args)
    loader, sampler, epoch = build_loader(args, args.views_on, device)
    torch.manual_seed(0)
    step, head = STEPS[args.method](args.arch, recipe, args.batch_size, device, fmt, 1,
                                    args.out_dim, args.compile)
    run = lambda batch: step(views.batch_to_crops(batch, device, fmt, sampler), autocast, scaler)
    timing, per_s = timed_epochs(epoch, run, device, args.warmup, args.steps, args.min_seconds)
    timed = TIMED["train"].format(views_on=args.views_on, extras=EXTRAS[args.method],
                                  prefetch="Prefetcher -> " if args.prefetch else "")
    return dict(mode="train", timed=timed, **settings(args, recipe, amp, head), data=args.data,
                image_set=describe_images(args.data), views_on=args.views_on,
                prefetch=args.prefetch, workers=args.workers,
                memory_format=str(fmt).split(".")[-1], **timing,
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
        help="untimed steps first (>= 1); data, train: whole epochs, at least one")
    add("--data", default="synthetic", help="data, train: " + views.DATA_HELP)
    add("--make-data", type=int, default=None, metavar="N",
        help="data, train: first generate N ImageNet-sized JPEGs (make_imagenet_like, 10 classes) "
             "into --data DIR (new or empty, kept) or, without --data, a temporary folder")
    add("--views-on", default=None, choices=["loader", "device", "both"],
        help="views made by the loader processes (PIL) or sampled on --device; data: default "
             "both, train: default loader")
    add("--profile-images", type=int, default=256,
        help="data: images drawn for the per-part CPU costs, measured in this process")
    add("--workers", type=int, default=os.cpu_count(),
        help="data, train: loader processes; data: 0 = only the per-part costs")
    add("--prefetch", type=int, choices=[0, 1], default=1,
        help="data, train: 1 = through views.Prefetcher, as the scripts (CUDA: copy on a side "
             "stream)")
    add("--json", default=None, help="also append the result as one JSON line to this file")
    return parser


def generated_data(args):
    """--make-data N: -> (the train folder of N generated JPEGs, the folder to delete after or
    None): into --data when given (it must hold no file yet), else into a temporary folder."""
    if args.data != "synthetic" and os.path.isdir(args.data) and os.listdir(args.data):
        raise SystemExit(f"--make-data: {args.data} is not empty")
    root = tempfile.mkdtemp(prefix="imagenet_like-") if args.data == "synthetic" else args.data
    make_imagenet_like(root, args.make_data, workers=os.cpu_count())
    return os.path.join(root, "train"), root if args.data == "synthetic" else None


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    views_on = args.views_on or ("both" if args.mode == "data" else "loader")
    if views_on == "both" and args.mode != "data":
        parser.error("--views-on both: data mode only")
    data, temporary = generated_data(args) if args.make_data else (args.data, None)
    try:
        result = MODES[args.mode](argparse.Namespace(**dict(vars(args), data=data,
                                                            views_on=views_on)))
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 reports
        return result
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
