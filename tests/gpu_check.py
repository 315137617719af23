"""One command for a GPU machine: environment, the CUDA tests, throughput, end to end from
ImageNet-sized JPEGs, a pilot baseline-vs-light pre-training, AMP runs of the scripts and one
compiled step, in at most 9 minutes.

    python3 tests/gpu_check.py --out OUT              # on a GPU machine (one H100 / H200, 16 cores)
    python3 tests/gpu_check.py --smoke --out /tmp/gc  # every stage tiny on the CPU, a typo check

Every command runs in its own subprocess with its own timeout, so a failure or a hang costs only
its own time. Each stage ends at a fixed point of the schedule (the running sum of BUDGETS), so time
a stage leaves unused goes to the next one, and the whole check ends within --budget seconds.
Results are appended to OUT/results.jsonl as they come (a kill keeps what was done), OUT/summary.md
(a markdown table for the README, its header the GPU, driver, torch, CUDA and commit) is rewritten
after each stage, and OUT/gpu_check.log holds every command and its whole output (progress bars
reduced to their last state).

Stages (budgets in seconds: 505 in all, 35 s of the 9 minutes left for Python's start and the end):
  data (25)      unpack --data-archive (Imagenette at 112 px) and generate 2,560 ImageNet-sized
                 JPEGs (tests/benchmark.py make_imagenet_like), before the clock of any stage
                 that needs them
  env (40)       GPU, driver, torch / torchvision / Python / CUDA versions, cores, /dev/shm's size
                 (15 loaders x 2 batches in flight need ~3 GiB there); a first CUDA start can
                 take 20 s
  tests (60)     the tests marked cuda, each result printed as it ends (pytest -v); the NCCL test
                 (torchrun, one process on the one GPU: NCCL's start, no DDP wrapper) apart, with
                 the stage's last 20 s
  step (55)      tests/benchmark.py step, batch 128, bf16, eager: DINO ResNet18 light, DINO
                 ViT-Tiny 2x224 + 6x96 K 65,536, DINO MobileNetV2 light, MoCo and SwAV ResNet18
                 light, in that order while the stage's time lasts
  e2e (80)       on the generated ImageNet-sized JPEGs, DINO ResNet18 light at 224 px: JPEG ->
                 loss with 15 loaders (tests/benchmark.py train), views by PIL in the loaders /
                 on the GPU, whole epochs timed after a warm-up epoch; then the CPU ms per image
                 of both input paths' parts (tests/benchmark.py data, 128 images)
  pretrain (95)  a pilot: dino.py on Imagenette at 112 px, --recipe baseline then light, identical
                 otherwise, kNN each epoch (epoch 0 = untrained), epochs chosen to end with a
                 margin. A few epochs on one seed cannot separate the recipes: its epoch time
                 sizes the next GPU run
  scripts (30)   dino.py, moco_v2.py, swav.py: 1 epoch on the synthetic set, --amp bf16 and fp16,
                 all at once; rc 0 and finite losses in log.jsonl (six runs share the GPU: no img/s)
  compile (120)  tests/benchmark.py step --compile of DINO ResNet18 light: a cold compile alone,
                 its first step (the compile) and its img/s beside the eager one
Without the archive pretrain is recorded as skipped.

--smoke runs every stage's commands on the CPU at tiny sizes (batch 8, 32 px crops, 1 timed step,
1 epoch, a tiny generated JPEG folder unless --data-archive is given, 16 ImageNet-sized JPEGs; the
tests stage only collects the cuda tests, which skip without CUDA; --compile through dynamo's eager
backend, no code generation), two stages at a time, so that the GPU run cannot fail on a typo.
"""
import argparse
import concurrent.futures
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# The stages' seconds on a GPU (see the docstring): 505 of the 540 that fit 9 minutes.
BUDGETS = dict(data=25, env=40, tests=60, step=55, e2e=80, pretrain=95, scripts=30, compile=120)
TOTAL_S = 540
NCCL_TEST = "tests/test_gpu_paths.py::test_torchrun_one_process_per_gpu"
NCCL_S = 20  # the tests stage's last seconds, for the NCCL test: torchrun and NCCL's start
IMAGENET_LIKE = 2560  # 20 batches of 128 an epoch: a few seconds an epoch with 15 loaders
# --smoke: per stage and in all, only guards against a hang, on 2 cores that others may share
SMOKE_BUDGET, SMOKE_TOTAL = 600, 1800
# Pre-training: the epoch count that fits its budget, from an estimate of one epoch of Imagenette
# (9,469 images at 112 px, 15 workers, kNN included) and of a run's fixed costs (start, epoch 0's
# kNN, saves), with a margin: a run killed at its timeout reports no last epoch. The estimates
# are guesses until a GPU run measures them: see the pilot's wall times and img/s.
PRETRAIN_EPOCH_S, PRETRAIN_OVERHEAD_S, PRETRAIN_MARGIN_S = 9.0, 20.0, 8.0
RESULTS, SUMMARY, LOG = "results.jsonl", "summary.md", "gpu_check.log"

# The step stage's networks, most wanted first; the first is also the compile stage's.
STEP_RUNS = [
    dict(name="DINO ResNet18 light", method="dino", arch="resnet18", recipe="light"),
    dict(name="DINO ViT-Tiny 2x224+6x96 K 65536", method="dino", arch="vit_tiny",
         recipe="baseline", local_crops=6, out_dim=65536),
    dict(name="DINO MobileNetV2 light", method="dino", arch="mobilenet_v2", recipe="light"),
    dict(name="MoCo ResNet18 light", method="moco", arch="resnet18", recipe="light"),
    dict(name="SwAV ResNet18 light", method="swav", arch="resnet18", recipe="light"),
]
E2E_ARMS = [("loader", "PIL views in the loaders"), ("device", "views on the GPU")]
SCRIPTS = {"dino": "dino.py", "moco": "moco_v2.py", "swav": "swav.py"}

ENV_SNIPPET = """
import json, os, platform, shutil
import torch
info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(), cuda_available=torch.cuda.is_available(),
            cpu_count=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)))
try:
    info["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 2)
except OSError as error:
    info["dev_shm_gib"] = f"absent: {error}"
try:
    import torchvision
    info["torchvision"] = torchvision.__version__
except Exception as error:
    info["torchvision"] = f"absent: {error}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpus=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                gpu_memory_gib=round(p.total_memory / 2**30, 1),
                bf16=torch.cuda.is_bf16_supported())
print(json.dumps(info))
"""


def commit_id():
    """The checkout's commit: from git where .git came along, else $SSLIGHT_COMMIT (set it when
    copying the tree without .git), else unknown."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip() + (" (uncommitted changes)" if subprocess.run(
                ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=10).stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("SSLIGHT_COMMIT", "unknown (no .git, no $SSLIGHT_COMMIT)")


def clean(text):
    """Progress bars redraw a line with carriage returns: keep each line's last state."""
    lines = text.replace("\r\n", "\n").split("\n")
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)


def last_json(text):
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def tail(text, lines=25, chars=3000):
    return "\n".join(text.splitlines()[-lines:])[-chars:]


class Check:
    """Runs commands with timeouts and records their results: one JSON line and one summary row
    each, and everything in the log."""

    def __init__(self, out, smoke, budget):
        os.makedirs(out, exist_ok=True)
        self.out, self.smoke, self.start = out, smoke, time.time()
        self.deadline = self.start + budget
        self.rows, self.lock = [], threading.Lock()
        self.header = dict(commit=commit_id())  # and the env stage's GPU, driver, torch, CUDA
        self.log_file = open(os.path.join(out, LOG), "a")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
        if smoke:  # the CPU's check, on any machine; one thread a process: they run side by side
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")

    def log(self, text, echo=False):
        with self.lock:
            self.log_file.write(text + "\n")
            self.log_file.flush()
        if echo:
            print(text, flush=True)

    def remaining(self, deadline):
        return min(deadline, self.deadline) - time.time()

    def cap(self, seconds, deadline):
        """A command's timeout: the time left to its stage, at most `seconds` on a GPU (the smoke
        check's are not timed, and others may share its cores)."""
        left = self.remaining(deadline)
        return left if self.smoke else min(seconds, left)

    def run(self, cmd, timeout, env=None):
        """-> (rc, wall seconds, output). The command leads a process group of its own, so a
        timeout ends it with its children (loader processes, compile workers): rc 124."""
        start = time.time()
        process = subprocess.Popen(cmd, cwd=ROOT, env=dict(self.env, **(env or {})),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # bytes: text mode would turn \r into \n
        try:
            output, _ = process.communicate(timeout=max(1.0, timeout))
            rc = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            try:
                output, _ = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # a child that left the group holds the pipe
                output = b"(no output: the pipe stayed open after the kill)"
            rc = 124
        output, wall = clean(output.decode(errors="replace")), round(time.time() - start, 1)
        self.log(f"$ {shlex.join(cmd)}\n{output}\n-> rc {rc} in {wall} s"
                 + (f" (timeout {timeout:.0f} s)" if rc == 124 else "") + "\n")
        return rc, wall, output

    def record(self, stage, what, settings="", result="", img_per_s=None, peak_gib=None,
               status="ok", **extra):
        entry = dict(stage=stage, what=what, settings=settings, result=result,
                     img_per_s=img_per_s, peak_gib=peak_gib, status=status, **extra)
        with self.lock:
            self.rows.append(entry)
            with open(os.path.join(self.out, RESULTS), "a") as f:
                f.write(json.dumps(entry) + "\n")
        print(f"[{time.time() - self.start:5.0f} s] {stage}: {what}: {status} {result}"[:300],
              flush=True)
        return entry

    def record_run(self, stage, what, settings, rc, wall, output, cmd, result="", **fields):
        """A finished command: ok on rc 0, else timeout / failed with the tail of its output."""
        status = "ok" if rc == 0 else "timeout" if rc == 124 else "failed"
        extra = dict(rc=rc, wall_s=wall, cmd=shlex.join(cmd))
        if status != "ok":
            extra["tail"] = tail(output)
            result = result or (f"no result in {wall:.0f} s" if rc == 124 else
                                tail(output, 1, 200))
        return self.record(stage, what, settings, result, status=status, **extra, **fields)

    def skip(self, stage, what, reason, settings=""):
        return self.record(stage, what, settings, reason, status="skipped")

    def write_summary(self):
        head = ["stage", "what", "settings", "result", "img/s", "peak GiB", "status"]
        cell = lambda v: "" if v is None else str(v).replace("|", "/").replace("\n", " ")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        order = list(STAGES)
        with self.lock:  # stage order, whatever order parallel stages finished in
            for r in sorted(self.rows, key=lambda r: order.index(r["stage"])):
                values = [r["stage"], r["what"], r["settings"], r["result"], r["img_per_s"],
                          r["peak_gib"], r["status"]]
                lines.append("| " + " | ".join(cell(v) for v in values) + " |")
        mode = "smoke (CPU, tiny sizes: no numbers to keep)" if self.smoke else "GPU"
        facts = ", ".join(f"{k} {v}" for k, v in self.header.items())
        text = (f"# tests/gpu_check.py, {mode}\n\n{time.strftime('%Y-%m-%d %H:%M')}, "
                f"{time.time() - self.start:.0f} s; {facts}\n\n" + "\n".join(lines) + "\n")
        with open(os.path.join(self.out, SUMMARY), "w") as f:
            f.write(text)
        return text


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def make_tiny_folder(root, classes=3, train=4, val=2, size=48):
    """A tiny ImageFolder of JPEGs (root/{train,val}/<class>/*.JPEG): colour blobs, a class each."""
    from PIL import Image, ImageDraw
    import random
    rng = random.Random(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
                x, y = rng.randrange(size // 2), rng.randrange(size // 2)
                draw = ImageDraw.Draw(image)
                draw.ellipse([x, y, x + size // 2, y + size // 2], fill=(80 * c, 255 - 80 * c, 128))
                image.save(os.path.join(folder, f"{split}_{i}.JPEG"), quality=90)
    return root


def prepare_archive(check, archive, given, tmp, deadline):
    """-> the root of train/ and val/, or None with the reason recorded."""
    if check.smoke and not given:
        started = time.time()
        root = make_tiny_folder(os.path.join(tmp, "tiny"))
        check.record("data", "tiny generated ImageFolder", "3 classes, 4 + 2 JPEGs each, 48 px",
                     root, wall_s=round(time.time() - started, 1))
        return root
    if not os.path.isfile(archive):
        check.skip("data", "unpack the Imagenette archive", f"no archive at {archive}")
        return None
    target = os.path.join(tmp, "data")
    os.makedirs(target)
    cmd = ["tar", "-xzf", os.path.abspath(archive), "-C", target]
    rc, wall, output = check.run(cmd, check.remaining(deadline))
    roots = [os.path.join(target, d) for d in sorted(os.listdir(target))
             if os.path.isdir(os.path.join(target, d, "train"))]
    if rc == 0 and os.path.isdir(os.path.join(target, "train")):
        roots = [target]
    root = roots[0] if rc == 0 and roots else None
    if root is None and rc == 0:
        rc, output = 1, f"no folder with train/ in {archive}"
    counts = root and {s: sum(len(f) for _, _, f in os.walk(os.path.join(root, s)))
                       for s in ("train", "val")}
    check.record_run("data", f"unpack {os.path.basename(archive)}", "into a temporary folder",
                     rc, wall, output, cmd, result=counts and f"{counts['train']} train / "
                     f"{counts['val']} val images")
    return root


def stage_data(check, deadline, context):
    """Imagenette (pretrain) unpacked, and the ImageNet-sized JPEGs (e2e) generated on every
    core."""
    context["data"] = prepare_archive(check, context["archive"], context["archive_given"],
                                      context["tmp"], deadline)
    root = os.path.join(context["tmp"], "imagenet_like")
    count = 16 if check.smoke else IMAGENET_LIKE  # smoke: 2 batches of 8 an epoch
    snippet = ("import json, sys; sys.path.insert(0, 'tests'); import benchmark; "
               f"benchmark.make_imagenet_like({root!r}, {count}, "
               f"workers={len(os.sched_getaffinity(0))}); "
               f"print(json.dumps(benchmark.describe_images({os.path.join(root, 'train')!r})))")
    cmd = [PY, "-c", snippet]
    rc, wall, output = check.run(cmd, check.remaining(deadline))
    info = last_json(output) if rc == 0 else None
    context["imagenet_like"] = info and os.path.join(root, "train")
    result = info and (f"{info['count']} JPEGs, mean {info['mean_kb']} KB, longer side (px) "
                       f"{info['longer_side_px']}, largest {info['largest']}")
    check.record_run("data", "generate ImageNet-sized JPEGs", "make_imagenet_like, 10 classes",
                     rc if info or rc else 1, wall, output, cmd, result=result or "",
                     image_set=info)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def stage_env(check, deadline, context):
    cmd = [PY, "-c", ENV_SNIPPET]
    rc, wall, output = check.run(cmd, check.remaining(deadline))
    info = last_json(output) or {}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        smi_rc, _, smi_out = check.run(query, max(3, check.remaining(deadline)))
        info["nvidia_smi"] = smi_out.strip() if smi_rc == 0 else f"rc {smi_rc}"
    else:
        info["nvidia_smi"] = "absent"
    context["env"] = info
    check.header.update(gpu=info.get("gpu", "none"), nvidia_smi=info["nvidia_smi"],
                        torch=info.get("torch"), cuda=info.get("cuda"))
    result = (f"{info.get('gpu', 'no GPU')}, nvidia-smi: {info['nvidia_smi']}, torch "
              f"{info.get('torch')}, torchvision {info.get('torchvision')}, Python "
              f"{info.get('python')}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, "
              f"{info.get('usable_cores')} of {info.get('cpu_count')} cores usable, /dev/shm "
              f"{info.get('dev_shm_gib')} GiB (15 loaders x 2 batches in flight: ~3 GiB)")
    check.record_run("env", "environment", "", rc, wall, output, cmd,
                     result=result if rc == 0 else "", env=info)


def pytest_results(output):
    """pytest -v's line per finished test -> {test id: PASSED / FAILED / ...}: also those that
    ended before a timeout."""
    results = {}
    for line in output.splitlines():
        match = re.match(r"(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
        if match:
            results[match.group(1)] = match.group(2)
    return results


def stage_tests(check, deadline, context):
    """The tests marked cuda (on the CPU of the smoke check: collected and skipped), each result
    printed as it ends; the NCCL test in a run of its own on the stage's last NCCL_S seconds, so
    that a hang in NCCL's start costs only those."""
    pytest = [PY, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "-m", "cuda"]
    # This check's own smoke test is no CUDA test: never run it from here, marked or not.
    runs = [("the cuda tests but NCCL's", deadline - NCCL_S,
             ["--ignore", os.path.join("tests", "test_gpu_check.py"), "--deselect", NCCL_TEST,
              "tests"]),
            ("NCCL: torchrun, one process on the one GPU, no DDP wrapper", deadline, [NCCL_TEST])]
    for what, end, selection in runs:
        cmd = pytest + selection
        rc, wall, output = check.run(cmd, check.remaining(end))
        results = pytest_results(output)
        counts = {}
        for status in results.values():
            counts[status.lower()] = counts.get(status.lower(), 0) + 1
        result = ", ".join(f"{n} {kind}" for kind, n in counts.items()) + f" in {wall:.0f} s"
        if rc == 5:  # pytest: no test selected
            rc, result = 0, "no test marked cuda selected"
        failed = [test for test, status in results.items() if status in ("FAILED", "ERROR")]
        check.record_run("tests", what, "pytest -v -m cuda" + (" (smoke: no CUDA, skipped)"
                                                               if check.smoke else ""),
                         rc, wall, output, cmd, result=result, counts=counts, tests=results,
                         failed_tests=failed)


def benchmark_cmd(mode, run, check, **flags):
    """tests/benchmark.py's command line: `run`'s network, the stage's flags, the check's sizes."""
    options = {k: v for k, v in run.items() if k != "name"}
    options.update(batch_size=128, device="cuda", **flags)
    if check.smoke:
        options.update(batch_size=8, global_size=32, local_crops=2, steps=1, min_seconds=0,
                       warmup=1, device="cpu")
        if options["arch"].startswith("vit"):
            options["local_size"] = 16  # a ViT's crops are whole 16 px patches
    cmd = [PY, os.path.join(ROOT, "tests", "benchmark.py"), mode]
    for key, value in options.items():
        if value is True:
            cmd.append("--" + key.replace("_", "-"))
        elif value is not False and value is not None:
            cmd += ["--" + key.replace("_", "-"), str(value)]
    return cmd


def describe(result):
    views = re.findall(r"(\d+)px", result["views"])
    n_local = re.search(r"\| (\d+) local", result["views"])
    crops = f"2x{views[0]}+{n_local.group(1)}x{views[1]}" if views and n_local else result["views"]
    text = (f"{result['arch']} {result['recipe']} {crops}, batch {result['batch_size']}, "
            f"{result['amp']}, {'compiled' if result['compile'] else 'eager'}")
    if result.get("head"):
        text += f", {result['head']}"
    if result["mode"] == "train":
        text += (f", views on {result['views_on']}, prefetch {result['prefetch']}, "
                 f"{result['workers']} workers")
    return text


def run_benchmark(check, stage, what, cmd, timeout):
    """A benchmark's JSON line is its result whatever its return code: a process that printed it
    and then timed out (or failed) on its way out keeps the measurement, the rc noted."""
    rc, wall, output = check.run(cmd, timeout)
    result = last_json(output)
    if result is None:
        return check.record_run(stage, what, "", rc or 1, wall, output, cmd), None
    if result["mode"] == "data":
        text = "; ".join(
            f"{name}: loader {p['loader_cpu_ms_per_image']} ms/img ("
            + ", ".join(f"{k} {v}" for k, v in p["loader_split_ms"].items())
            + f") -> {p['projected_img_per_s']} img/s with 15 loaders, main process "
            f"{p['main_process_cpu_ms_per_image']} ms/img on {p['main_process_on']}"
            for name, p in result["paths"].items())
    else:
        n = result.get("epochs")
        epochs = f" ({n} epoch{'s' * (n != 1)})" if n else ""
        first = f", first step {result['first_step_s']} s" if result["compile"] else ""
        text = f"{result['batches']} batches{epochs} in {result['seconds']} s{first}"
    if rc:
        text += f"; rc {rc} after its result line (see the log)"
    entry = check.record(stage, what, describe(result), text, img_per_s=result.get("img_per_s"),
                         peak_gib=result.get("peak_memory_gib"), rc=rc, wall_s=wall,
                         cmd=shlex.join(cmd), benchmark=result, tail=tail(output) if rc else None)
    return entry, result


def stage_step(check, deadline, context):
    timing = dict(steps=20, min_seconds=3, warmup=5)  # the smoke sizes replace them
    for run in STEP_RUNS:
        if check.remaining(deadline) < 10:
            check.skip("step", run["name"] + ", eager", "the stage's time is spent")
            continue
        cmd = benchmark_cmd("step", run, check, amp="bf16", **timing)
        run_benchmark(check, "step", run["name"], cmd, check.cap(25, deadline))


def stage_e2e(check, deadline, context):
    """On the generated ImageNet-sized JPEGs: the two arms end to end, then the per-part costs."""
    data, run = context.get("imagenet_like"), STEP_RUNS[0]
    label = "ImageNet-sized JPEGs"
    for views_on, name in E2E_ARMS:
        what = f"DINO ResNet18 JPEG -> loss, {name}, 15 loaders, {label}"
        if not data or check.remaining(deadline) < 15:
            check.skip("e2e", what, "no generated JPEGs" if not data
                       else "the stage's time is spent")
            continue
        # 20 batches an epoch: a warm-up epoch, then >= 1 whole epoch and >= 6 s on the clock
        flags = dict(workers=1) if check.smoke else dict(steps=20, min_seconds=6, warmup=1,
                                                          workers=15, global_size=224)
        cmd = benchmark_cmd("train", run, check, amp="bf16", views_on=views_on, prefetch=1,
                            data=data, **flags)
        run_benchmark(check, "e2e", what, cmd, check.cap(35, deadline))
    what = f"CPU ms per image of both input paths, {label}"
    if not data or check.remaining(deadline) < 10:
        check.skip("e2e", what, "no generated JPEGs" if not data else "the stage's time is spent")
        return
    cmd = benchmark_cmd("data", run, check, amp="bf16", views_on="both", data=data, workers=0,
                        profile_images=8 if check.smoke else 128)
    run_benchmark(check, "e2e", what, cmd, check.remaining(deadline))


def script_cmd(method, check, output_dir, *extra):
    return [PY, os.path.join(ROOT, SCRIPTS[method]), "--output-dir", output_dir,
            "--device", "cpu" if check.smoke else "cuda", *map(str, extra)]


def read_log(output_dir):
    path = os.path.join(output_dir, "log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pretrain_epochs(seconds_left):
    """The epochs that let both arms, one after the other, end within seconds_left, each with
    PRETRAIN_MARGIN_S to spare."""
    per_arm = seconds_left / 2 - PRETRAIN_OVERHEAD_S - PRETRAIN_MARGIN_S
    return max(1, min(100, int(per_arm // PRETRAIN_EPOCH_S)))


def stage_pretrain(check, deadline, context):
    arms = ("baseline", "light")
    if not context.get("data"):
        for recipe in arms:
            check.skip("pretrain", f"pilot: dino.py ResNet18 --recipe {recipe}",
                       context.get("no_data"))
        return
    if check.smoke:
        epochs = 1
        # amp off: CPU bf16 gave a non-finite loss at step 3 of the baseline arm at these sizes
        # (14 px locals); the scripts stage checks the CPU's bf16 and fp16 branches.
        flags = ["--batch-size", 8, "--global-size", 32, "--local-crops", 2, "--out-dim", 256,
                 "--workers", 1, "--amp", "off"]
    else:
        epochs = context["epochs"] or pretrain_epochs(check.remaining(deadline))
        flags = ["--batch-size", 128, "--global-size", 112, "--out-dim", 4096, "--workers", 15,
                 "--amp", "bf16"]
    # Short-run values (the README's CIFAR-10 command): SGD, no warm-up, a sharp teacher, a fast
    # EMA; both arms identical but for --recipe.
    flags += ["--epochs", epochs, "--optimizer", "sgd", "--lr", 0.1, "--min-lr", 0,
              "--warmup-epochs", 0, "--weight-decay", 5e-4, "--weight-decay-end", 5e-4,
              "--teacher-temp", 0.02, "--warmup-teacher-temp-epochs", 0,
              "--momentum-teacher", 0.99, "--freeze-last-layer", 0, "--arch", "resnet18",
              "--data", os.path.join(context["data"], "train"), "--eval-data", context["data"]]
    settings = " ".join(map(str, flags[:flags.index("--data")]))
    for i, recipe in enumerate(arms):
        output_dir = os.path.join(context["tmp"], f"pretrain-{recipe}")
        cmd = script_cmd("dino", check, output_dir, "--recipe", recipe, *flags)
        # The first arm gets half the time left: a budget kill leaves both arms equally far.
        timeout = check.remaining(deadline) / (len(arms) - i)
        if timeout < 15:
            check.skip("pretrain", f"pilot: dino.py ResNet18 --recipe {recipe}",
                       "the stage's time is spent")
            continue
        rc, wall, output = check.run(cmd, timeout)
        records = read_log(output_dir)
        knn = [r["knn_top1"] for r in records if "knn_top1" in r]
        speeds = [r["img_per_s"] for r in records if "img_per_s" in r]
        epochs_done = sum(1 for r in records if r.get("epoch", 0) > 0)
        result = ("kNN top-1 " + " -> ".join(f"{k:.1f}" for k in knn) +
                  f" ({epochs_done} of {epochs} epochs, epoch 0 = untrained, {wall:.0f} s)")
        speed = sorted(speeds)[len(speeds) // 2] if speeds else None  # the median epoch
        check.record_run("pretrain", f"pilot: dino.py ResNet18 --recipe {recipe}", settings,
                         rc, wall,
                         output, cmd, result=result if knn else "", img_per_s=speed,
                         knn_curve=knn, img_per_s_epochs=speeds, records=records)


def run_parallel(check, jobs, deadline):
    """jobs: [(cmd, env, on_done(rc, wall, output))] at once (each its own timeout), then wait."""
    def work(cmd, env, done):
        done(*check.run(cmd, check.remaining(deadline), env))
    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def script_runs(check, deadline, context, stage, variants):
    """1 epoch of each script per variant (--amp, --compile), all at once: a correctness check."""
    if check.smoke and not context.get("data"):
        for method in SCRIPTS:
            check.skip(stage, f"{SCRIPTS[method]} 1 epoch", "no tiny data")
        return
    if check.smoke:  # the tiny folder: 12 images, 2 steps of 6 (a CPU's fp16 step takes seconds)
        common = ["--data", os.path.join(context["data"], "train"), "--batch-size", 6,
                  "--global-size", 32, "--local-crops", 2, "--workers", 1]
    else:  # the built-in synthetic set: 640 images, 20 steps of 32
        common = ["--data", "synthetic", "--batch-size", 32, "--global-size", 64, "--workers", 2]
    batch = common[common.index("--batch-size") + 1]
    method_flags = {"dino": ["--out-dim", 1024],
                    "moco": ["--queue-size", 1024],
                    # a queue full after one step, so that its path runs too
                    "swav": ["--queue-length", batch, "--epoch-queue-starts", 0]}
    jobs = []
    for method in SCRIPTS:
        for name, extra in variants:
            output_dir = os.path.join(context["tmp"], f"{stage}-{method}-{extra[1]}")
            flags = ["--epochs", 1, *common, *method_flags[method], *extra]
            cmd = script_cmd(method, check, output_dir, *flags)
            what = f"{SCRIPTS[method]} 1 epoch, {name}"
            jobs.append((cmd, {}, script_done(check, stage, what, flags, output_dir, cmd)))
    run_parallel(check, jobs, deadline)


def script_done(check, stage, what, flags, output_dir, cmd):
    def done(rc, wall, output):
        records = [r for r in read_log(output_dir) if r.get("epoch", 0) > 0]
        losses = [r["loss"] for r in records]
        finite = bool(losses) and all(math.isfinite(x) for x in losses)
        if rc == 0 and not finite:
            rc, output = 1, output + f"\nlog.jsonl: losses {losses}, not all finite"
        # No img/s: the runs share one GPU, so their speeds say nothing.
        result = f"loss {losses[-1]:.4f}" if losses else ""
        check.record_run(stage, what, " ".join(map(str, flags)), rc, wall, output, cmd,
                         result=result, losses=losses)
    return done


def stage_scripts(check, deadline, context):
    script_runs(check, deadline, context, "scripts",
                [("bf16", ["--amp", "bf16"]), ("fp16", ["--amp", "fp16"])])


def stage_compile(check, deadline, context):
    """One cold compile alone, of the network most wanted: its first step is the compile."""
    run = STEP_RUNS[0]
    cmd = benchmark_cmd("step", run, check, amp="bf16", compile=True, steps=20, min_seconds=3,
                        warmup=5)
    run_benchmark(check, "compile", run["name"] + ", compiled", cmd, check.remaining(deadline))


STAGES = dict(data=stage_data, env=stage_env, tests=stage_tests, step=stage_step, e2e=stage_e2e,
              pretrain=stage_pretrain, scripts=stage_scripts, compile=stage_compile)


def run_stages(check, args, context):
    """One after the other, each ending on the schedule (the running sum of BUDGETS, so that time
    a stage leaves goes to the next); or, with --parallel N, data first and then the others N at
    a time, each with its budget."""
    def run(name, deadline):
        check.log(f"== {name}: until {deadline - check.start:.0f} s ==", echo=True)
        try:
            STAGES[name](check, deadline, context)
        except Exception as error:  # a bug here must not cost the stages after it
            check.record(name, f"stage {name}", "", f"gpu_check error: {error!r}",
                         status="failed")
        check.write_summary()

    budget = lambda name: SMOKE_BUDGET if args.smoke else BUDGETS[name]
    if args.parallel == 1:
        end = check.start
        for name in args.stages:
            end = time.time() + budget(name) if args.smoke else end + budget(name)
            run(name, end)
        return
    rest = [name for name in args.stages if name != "data"]
    if "data" in args.stages:  # the stages after it read its folders
        run("data", time.time() + budget("data"))
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for future in [pool.submit(lambda n: run(n, time.time() + budget(n)), name)
                       for name in rest]:
            future.result()


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results.jsonl, summary.md, gpu_check.log")
    parser.add_argument("--data-archive", default=None,
                        help="Imagenette at 112 px, tar.gz of imagenette2-112/{train,val} "
                             "(default data/imagenette2-112.tar.gz of the checkout)")
    parser.add_argument("--smoke", action="store_true",
                        help="every stage on the CPU at tiny sizes: checks the commands, not speed")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES),
                        help="a subset, e.g. to rerun one (data is added where a stage needs it)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole check, default {sum(BUDGETS.values())} of "
                             f"the {TOTAL_S} that fit 9 minutes (--smoke: {SMOKE_TOTAL}); stages "
                             "end on the schedule of BUDGETS")
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help="default: as many as the pre-training stage's time allows")
    parser.add_argument("--parallel", type=int, default=None,
                        help="stages at once: 1 on a GPU (the timings need the machine alone), "
                             "2 with --smoke (its commands are checked, not timed)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.parallel = args.parallel or (2 if args.smoke else 1)
    args.budget = args.budget or (SMOKE_TOTAL if args.smoke else sum(BUDGETS.values()))
    if {"e2e", "pretrain", "scripts"} & set(args.stages) and "data" not in args.stages:
        args.stages = ["data"] + args.stages
    archive = args.data_archive or os.path.join(ROOT, "data", "imagenette2-112.tar.gz")
    check = Check(args.out, args.smoke, args.budget)
    if args.smoke:
        # Compile through dynamo only (no code generation): the path is checked in seconds.
        check.env["TORCH_COMPILE_OVERRIDE_BACKENDS"] = ">=0:eager"
    check.log(f"gpu_check {'--smoke ' if args.smoke else ''}stages {args.stages}, budget "
              f"{args.budget:.0f} s, {time.strftime('%Y-%m-%d %H:%M:%S')}", echo=True)
    tmp = tempfile.mkdtemp(prefix="gpu_check-")
    context = dict(tmp=tmp, epochs=args.pretrain_epochs, archive=archive,
                   archive_given=args.data_archive is not None,
                   no_data=f"no data: {archive} is absent")
    try:
        run_stages(check, args, context)
    finally:
        summary = check.write_summary()
        shutil.rmtree(tmp, ignore_errors=True)
    print(summary, flush=True)
    return 0 if {r["status"] for r in check.rows} <= {"ok", "skipped"} else 1


if __name__ == "__main__":
    sys.exit(main())
