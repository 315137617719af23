"""Run a method's main() under torchrun and save each rank's final state dicts.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py dino OUT_PREFIX [flags]
writes OUT_PREFIX.rank0, OUT_PREFIX.rank1: {name: state_dict} of the modules main() returns."""
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
module_name, out_prefix, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
method = importlib.import_module(module_name)
rank = int(os.environ["RANK"])
modules = method.main(flags)
torch.save({name: m.state_dict() if hasattr(m, "state_dict") else m for name, m in modules.items()},
           f"{out_prefix}.rank{rank}")
