"""Each script stands alone beside backbones.py and views.py; a function written in several
scripts is the same text in each (so a fix cannot land in one copy only); a script carries only
what it calls; line widths and script sizes."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_image_folder

SCRIPTS = ["dino.py", "moco_v2.py", "swav.py", "linear_eval.py"]
START, END = "# ---- plumbing:", "# ---- end of plumbing ----"
PROJECT_MODULES = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")}


def plumbing_block(script):
    text = open(os.path.join(ROOT, script)).read()
    assert text.count(START) == 1 and text.count(END) == 1, f"{script}: one delimited plumbing block"
    return text[text.index(START):text.index(END) + len(END)]


def top_level_definitions(path):
    """{name: source text} of the module's top-level functions, classes and assignments."""
    text = open(path).read()
    definitions = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            definitions[node.targets[0].id] = ast.get_source_segment(text, node)
    return definitions


PER_SCRIPT = {"main", "get_args_parser", "resolve_config", "PAPER_DEFAULTS", "PAPER_EPOCHS",
              "PAPER_WARMUPS", "THIS_RUN", "RESUMABLE", "FLAG_RANGES",
              "POSITIVE_FLAGS"}  # each script's own, by name only


def test_a_function_in_several_scripts_is_the_same_text_in_each():
    definitions = {script: top_level_definitions(os.path.join(ROOT, script)) for script in SCRIPTS}
    shared = 0
    for script, names in definitions.items():
        for other in SCRIPTS[SCRIPTS.index(script) + 1:]:
            for name in names.keys() & definitions[other].keys():
                if name not in PER_SCRIPT:
                    shared += 1
                    assert names[name] == definitions[other][name], f"{name}: {script} != {other}"
    assert shared > 20  # the plumbing, LARS and param_groups
    for script in SCRIPTS:
        assert "args." not in plumbing_block(script)  # its functions take explicit values


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_carries_only_what_it_calls(script):
    """No dead code: every top-level function, class and constant of a script is used in it."""
    text = open(os.path.join(ROOT, script)).read()
    for name, source in top_level_definitions(os.path.join(ROOT, script)).items():
        rest = text.replace(source, "")
        assert re.search(rf"(?<![.\w]){name}\b", rest), f"{script}: {name} is never used"


# A script's own code (flags, model, loss, main loop: what a reader studies) sits above its
# plumbing block, which is the same text in every script and is read once. The own code of a method
# script is held within 500 lines (official main_dino.py 471, main_moco.py 402, main_swav.py 380),
# the plumbing block within 230, and linear_eval.py within 650 in all, so that each script can be
# read in one sitting.
OWN_CODE, PLUMBING, LINEAR_EVAL = 500, 230, 650
METHOD_SCRIPTS = ["dino.py", "moco_v2.py", "swav.py"]


@pytest.mark.parametrize("script", SCRIPTS + ["backbones.py", "views.py"])
def test_lines_of_at_most_100_characters(script):
    lines = open(os.path.join(ROOT, script)).read().splitlines()
    long_lines = [n for n, line in enumerate(lines, 1) if len(line) > 100]
    assert not long_lines, f"{script}: lines over 100 characters: {long_lines}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_sizes(script):
    text = open(os.path.join(ROOT, script)).read()
    plumbing = plumbing_block(script).count("\n") + 1
    assert plumbing <= PLUMBING, f"{script}: a plumbing block of {plumbing} lines"
    if script in METHOD_SCRIPTS:
        own = text[:text.index(START)].count("\n")
        assert own <= OWN_CODE, f"{script}: {own} lines above the plumbing block"
    else:
        assert text.count("\n") <= LINEAR_EVAL, f"{script}: {text.count(chr(10))} lines"


def test_top_level_holds_only_the_projects_files():
    allowed = {"README.md", "requirements.txt", "moco_v2.py", "swav.py", "dino.py", "backbones.py", "views.py",
               "linear_eval.py", "tests", ".ci", ".gitignore", "assets", "LICENSE", "docs"}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert {path.split("/")[0] for path in tracked} <= allowed


@pytest.mark.parametrize("script", SCRIPTS + ["backbones.py", "views.py"])
def test_imports_from_the_project_only_backbones_and_views(script):
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported & PROJECT_MODULES <= ({"backbones", "views"} - {script[:-3]})


TINY = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--global-size", "32", "--local-crops", "1"]
METHOD_FLAGS = {"dino.py": ["--out-dim", "32"], "moco_v2.py": ["--queue-size", "64"],
                "swav.py": ["--num-prototypes", "16", "--queue-length", "0"]}


def test_each_copied_script_runs_alone(tmp_path):
    """Copy each script with backbones.py and views.py into an empty folder of its own: a 1-epoch
    CPU run that exports its backbone (linear_eval: a kNN evaluation). The four runs are launched
    at once (each on one thread; most of their time is the import). The finished rerun and
    torchrun: each script's own tests."""
    data = make_image_folder(tmp_path / "images", n_per_class=4)
    make_image_folder(tmp_path / "eval" / "train", n_per_class=4)
    make_image_folder(tmp_path / "eval" / "val", n_per_class=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    processes = {}
    for script in SCRIPTS:
        folder = tmp_path / f"alone_{script}"
        folder.mkdir()
        for name in (script, "backbones.py", "views.py"):
            shutil.copy(os.path.join(ROOT, name), folder)
        if script == "linear_eval.py":
            flags = ["--mode", "knn", "--checkpoint", "none", "--data", str(tmp_path / "eval"),
                     "--global-size", "32", "--workers", "0"]
        else:
            flags = ["--data", data, "--output-dir", "run", *TINY, *METHOD_FLAGS[script],
                     "--export", "b.pth"]
        with open(folder / "output.txt", "w") as output:  # a file: a full pipe would stall a run
            processes[script] = subprocess.Popen([sys.executable, script, *flags], cwd=folder,
                                                 env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        for script, process in processes.items():
            process.wait(timeout=300)
            output = (tmp_path / f"alone_{script}" / "output.txt").read_text()
            assert process.returncode == 0, f"{script}: {output[-5000:]}"
            if script != "linear_eval.py":
                assert torch.load(tmp_path / f"alone_{script}" / "b.pth")  # the backbone's weights
    finally:
        for process in processes.values():
            process.kill()
            process.wait()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_the_documentation(script):
    """--help renders (a stray % in a help string would raise here) and names the paper's values."""
    module = __import__(os.path.splitext(script)[0])
    text = module.get_args_parser().format_help()
    assert text.startswith("usage") and "paper" in text


# ----------------------------------------------------------------------------------------------
# The plumbing's CUDA decisions, checked on the CPU (through dino.py's copy; the others are identical)
# ----------------------------------------------------------------------------------------------

def test_amp_auto_picks_fp16_below_compute_capability_8_and_fp32_matmuls_when_off(monkeypatch):
    import dino
    before = torch.get_float32_matmul_precision()
    try:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4 / RTX 20xx
        amp, note = dino.resolve_amp("auto", torch.device("cuda"))
        assert amp == "fp16" and "compute capability < 8.0" in note
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
        assert dino.resolve_amp("auto", torch.device("cuda")) == ("bf16", "")
        assert torch.get_float32_matmul_precision() == "high"  # TF32 only with mixed precision on
        assert dino.resolve_amp("off", torch.device("cuda"))[0] == "off"
        assert torch.get_float32_matmul_precision() == "highest"  # --amp off = fp32 matmuls
        assert dino.resolve_amp("auto", torch.device("cpu"))[0] == "off"
        assert dino.resolve_amp("fp16", torch.device("cpu"))[0] == "fp16"  # forced: the CPU runs the AMP branch
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.benchmark = False


def test_cuda_device_index_is_the_local_rank_modulo_the_visible_gpus(monkeypatch):
    """A launcher that shows each process only its own GPU (SLURM --gpus-per-task=1): LOCAL_RANK 3, 1 device."""
    import dino
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("device", device))
    monkeypatch.setattr(dino.dist, "init_process_group", lambda backend, **kw: calls.setdefault("backend", backend))
    monkeypatch.setattr(dino.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dino.dist, "get_world_size", lambda: 4)
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")):
        monkeypatch.setenv(name, value)
    rank, world_size, device = dino.init_distributed("auto", seed=0)
    assert (rank, world_size, device, calls["backend"]) == (3, 4, torch.device("cuda", 0), "nccl")
    assert calls["device"] == torch.device("cuda", 0)


def test_lars_trust_ratio_and_exclusions():
    import dino
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||p|| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    zero = torch.nn.Parameter(torch.zeros(1, 2))  # ||p|| = 0: no adaptation
    weight.grad, bias.grad, zero.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5]), torch.tensor([[1.0, 0.0]])
    optimizer = dino.LARS([dict(params=[weight, zero], lars_exclude=False), dict(params=[bias], lars_exclude=True)],
                          lr=0.1, weight_decay=0.0, momentum=0.9, eta=0.001)
    optimizer.step()
    g = torch.tensor([[0.0, 2.0]]) * 0.001 * 5 / 2  # eta * ||p|| / ||g||
    torch.testing.assert_close(weight.data, torch.tensor([[3.0, 4.0]]) - 0.1 * g)
    torch.testing.assert_close(bias.data, torch.tensor([1.0 - 0.1 * 0.5]))  # excluded: the plain gradient
    torch.testing.assert_close(zero.data, torch.tensor([[-0.1, 0.0]]))
    optimizer.step()  # momentum: mu = 0.9 * mu + g
    torch.testing.assert_close(bias.data, torch.tensor([1.0 - 0.1 * 0.5 - 0.1 * (0.9 * 0.5 + 0.5)]))


def test_param_groups_follow_the_paper():
    import dino
    model = backbones_module().build_backbone("mobilenet_v2")
    groups = dino.param_groups([model])
    regularized, depthwise, plain = groups
    assert all(p.ndim >= 2 and not (p.ndim == 4 and p.shape[1] == 1) for p in regularized["params"])
    assert depthwise["params"] and all(p.ndim == 4 and p.shape[1] == 1 for p in depthwise["params"])
    assert all(p.ndim < 2 for p in plain["params"])
    assert [(g["wd_factor"], g["lars_exclude"]) for g in groups] == [(1.0, False), (0.0, False), (0.0, True)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(dino.param_groups([model], decay_all=True)) == 1


def backbones_module():
    import backbones
    return backbones


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_defaults_its_workers_to_the_nodes_share(script):
    """--workers left out means loader_workers(None) (cores / processes per node, at most 8) in every script."""
    source = open(os.path.join(ROOT, script)).read()
    module = __import__(os.path.splitext(script)[0])
    assert module.get_args_parser().get_default("workers") is None
    assert "config.workers = loader_workers(config.workers)" in source or "loader_workers(args.workers)" in source
