"""Small-scale reproduction of the paper's claim: baseline vs light views at equal epochs. Not collected by pytest.

For each (method, arch) it pre-trains with --recipe baseline and --recipe light, then evaluates
both backbones with kNN (k 20, T 0.07) and the linear probe, and prints one table. Every run is a
plain command of this repo (printed before it starts), its output dir lives under --output-dir,
and a finished step is skipped when the command is run again, so a long reproduction can be
spread over several sittings (pre-training resumes from its checkpoint).

    # data/imagenette2-112: the 112 px Imagenette, made as docs/data.md says
    python tests/reproduce.py --data data/imagenette2-112 --global-size 112 --epochs 50 \
        --runs dino:resnet18 dino:mobilenet_v2 dino:vit_tiny moco:mobilenet_v2
    python tests/reproduce.py ... --dry-run        # only print the commands

At 112 px the local crops scale with the global size: 48 px (baseline) vs 64 px (light).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"dino": "dino.py", "moco": "moco_v2.py", "swav": "swav.py"}


def run(cmd, dry_run):
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if dry_run:
        return 0.0
    start = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - start


def launcher(nproc):
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    return [sys.executable]


def main(args):
    rows = []
    # Each script's default shares the node's cores among its processes; an explicit value is per process.
    workers = ["--workers", str(args.workers)] if args.workers is not None else []
    for spec in args.runs:
        method, arch = spec.split(":")
        for recipe in ("baseline", "light"):
            out = os.path.join(args.output_dir, f"{method}-{arch}-{recipe}")
            checkpoint = os.path.join(out, "checkpoint.pth")
            pretrain = launcher(args.nproc) + [
                os.path.join(ROOT, SCRIPTS[method]), "--arch", arch, "--recipe", recipe,
                "--data", os.path.join(args.data, "train"),
                "--output-dir", out, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                "--global-size", str(args.global_size), *workers, *args.extra]
            seconds = run(pretrain, args.dry_run)
            row = dict(method=method, arch=arch, recipe=recipe, epochs=args.epochs, pretrain_min=round(seconds / 60, 1))
            for mode, epochs in (("knn", None), ("linear", args.probe_epochs)):
                result_path = os.path.join(out, f"{mode}.json")
                if not os.path.exists(result_path):
                    evaluate = launcher(args.nproc) + [
                        os.path.join(ROOT, "linear_eval.py"), "--mode", mode, "--arch", arch,
                        "--checkpoint", checkpoint,
                        "--data", args.data, "--global-size", str(args.global_size), *workers,
                        "--output", result_path, "--batch-size", str(args.batch_size)]
                    run(evaluate + (["--epochs", str(epochs)] if epochs else []), args.dry_run)
                if os.path.exists(result_path):
                    with open(result_path) as f:
                        result = json.load(f)
                    row[f"{mode}_top1"] = round(result["final_top1"], 2)
                    if mode == "linear":
                        row["linear_best_top1"] = round(result["best_top1"], 2)
            rows.append(row)
    columns = ["method", "arch", "recipe", "epochs", "knn_top1", "linear_top1", "linear_best_top1", "pretrain_min"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "–")) for c in columns) + " |")
    if args.table:
        with open(args.table, "a") as f:
            f.write(json.dumps(rows) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a root with train/ and val/ ImageFolders")
    parser.add_argument("--runs", nargs="+", default=["dino:resnet18"], help="method:arch pairs")
    parser.add_argument("--epochs", type=int, default=50, help="pre-training epochs, the same for both recipes")
    parser.add_argument("--probe-epochs", type=int, default=30, help="linear probe epochs (paper 100)")
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--global-size", type=int, default=112)
    parser.add_argument("--workers", type=int, default=None,
                        help="loader processes per process (default: the cores / --nproc, at most 8)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    parser.add_argument("--output-dir", default="runs/reproduce")
    parser.add_argument("--table", default=None, help="also append the rows as JSON to this file")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="everything after --extra goes to the pre-training script (e.g. --extra --out-dim 4096)")
    main(parser.parse_args())
