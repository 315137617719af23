"""Throughput and memory of the training step, and of the data pipeline.

Step mode: the method's own main() runs unchanged, but its data loader is replaced by one that
serves the same random crops, already on the device, so the number is the training step alone
(forward, loss, backward, optimizer, EMA/queue, one host sync per --log-every steps). Epoch 1 is
the warm-up (cudnn autotuning, allocator); epoch 2 is timed. Peak memory is
torch.cuda.max_memory_allocated over the timed epoch.

    python benchmark.py step --method dino --arch vit_tiny --recipe baseline --batch-size 128 --amp bf16
    python benchmark.py step --method dino --arch resnet18 --recipe light
    python benchmark.py data --data /path/train --recipe light --workers 16    # JPEG -> crops, img/s

The paper's throughput setting is batch 128 per GPU with 2x224 + 6x96 crops (baseline) or
2x224 + 6x128 (light); ViT-Tiny uses 10 local crops.
"""
import argparse
import importlib
import json
import os
import tempfile
import time

import torch

import training
from views import MultiCropTransform, describe


class DeviceCropLoader:
    """Stands in for the DataLoader: `steps` batches of fixed random crops already on the device."""

    class Sampler:
        skip_batches = 0

        def set_epoch(self, epoch):
            if epoch == 1 and torch.cuda.is_available():  # the timed epoch starts: reset the peak
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

    def __init__(self, recipe, batch_size, steps, device, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        sizes = [recipe.global_size] * 2 + [recipe.local_size] * recipe.local_crops
        self.crops = [torch.randn(batch_size, 3, s, s, device=device).contiguous(memory_format=fmt) for s in sizes]
        self.labels = torch.zeros(batch_size, dtype=torch.long)
        self.steps, self.sampler = steps, self.Sampler()

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([(self.crops, self.labels)] * (self.steps - self.sampler.skip_batches))


def benchmark_step(args, passthrough):
    method = importlib.import_module({"dino": "dino", "moco": "moco_v2", "swav": "swav"}[args.method])
    with tempfile.TemporaryDirectory() as output_dir:
        flags = ["--arch", args.arch, "--recipe", args.recipe, "--batch-size", str(args.batch_size),
                 "--amp", args.amp, "--epochs", "2", "--workers", "0", "--output-dir", output_dir,
                 "--log-every", str(args.log_every), "--device", args.device] + passthrough
        for flag, value in (("--global-size", args.global_size), ("--local-crops", args.local_crops)):
            if value is not None:
                flags += [flag, str(value)]
        method_args = method.get_args_parser().parse_args(flags)
        state = {}

        def fake_loader(dataset, run_args, run):
            recipe = training.recipe_from_args(run_args, args.method)
            state["recipe"], state["device"] = recipe, run.device
            channels_last = run.device.type == "cuda" and not run_args.arch.startswith("vit")
            return DeviceCropLoader(recipe, run_args.batch_size, args.steps, run.device, channels_last)

        training.build_train_loader = fake_loader
        method.main(method_args)
        with open(os.path.join(output_dir, "log.jsonl")) as f:
            timed = [json.loads(line) for line in f][-1]
    on_cuda = state["device"].type == "cuda"
    result = dict(mode="step", method=args.method, arch=args.arch, recipe=args.recipe, views=describe(state["recipe"]),
                  batch_size=args.batch_size, amp=args.amp if on_cuda else "off (CPU)", steps=args.steps,
                  device=torch.cuda.get_device_name() if on_cuda else "cpu", img_per_s=timed["img_per_s"],
                  peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda else None,
                  torch=torch.__version__)
    return result


def benchmark_data(args):
    recipe = training.recipe_from_args(args, args.method)
    dataset = training.build_dataset(args.data, MultiCropTransform(recipe))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    batches = iter(loader)
    for _ in range(args.warmup):
        next(batches)
    start = time.time()
    for _ in range(args.steps):
        next(batches)
    elapsed = time.time() - start
    return dict(mode="data", method=args.method, recipe=args.recipe, views=describe(recipe), workers=args.workers,
                cpu_count=os.cpu_count(), img_per_s=round(args.steps * args.batch_size / elapsed, 1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["step", "data"])
    parser.add_argument("--method", default="dino", choices=["dino", "moco", "swav"])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--recipe", default="baseline", help="baseline (2x224 + 6x96) or light (2x224 + 6x128)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=50, help="timed steps (step mode: also the warm-up epoch's)")
    parser.add_argument("--warmup", type=int, default=5, help="data mode: untimed batches first")
    parser.add_argument("--global-size", type=int, default=None, help="224 (the local size follows)")
    parser.add_argument("--local-crops", type=int, default=None, help="6 for CNNs, 10 for ViT-Tiny in the paper")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--data", default="synthetic", help="data mode: the image folder to read")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="data mode: loader processes")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args, passthrough = parser.parse_known_args()  # unknown flags go to the method (e.g. --local-crops 10)
    for name in ("local_size", "global_scale", "local_scale", "loss_weights"):  # the recipe's own values
        setattr(args, name, None)
    result = benchmark_step(args, passthrough) if args.mode == "step" else benchmark_data(args)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
