"""SGLang reads adapter weights through safetensors' memory map and keeps views of the file;
rewritten in place or truncated (an operator replacing an adapter), the file then takes the
process down with SIGBUS at the next copy of those weights (found by the soak with faults).
``own_weight_memory`` copies them out, for adapters our workers read and SGLang's own reads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chameleon_sglang.dev.assets import Assets

SCRIPT = """
import sys
from transformers import AutoConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.lora.lora import LoRAAdapter
from sglang.srt.lora.lora_config import LoRAConfig
from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler
from chameleon_sglang.integration.hooks.adapter_loads import own_weight_memory

model, adapter_dir, own = sys.argv[1], sys.argv[2], sys.argv[3] == "own"
set_global_server_args_for_scheduler(ServerArgs(model_path=model, device="cpu"))
base = AutoConfig.from_pretrained(model)
adapter = LoRAAdapter("x", LoRAConfig(adapter_dir), base, LoadConfig(), None)
adapter.initialize_weights()
if own:
    own_weight_memory(adapter)
with open(adapter_dir + "/adapter_model.safetensors", "r+b") as weights:
    weights.truncate(128)
print(sum(float(w.float().sum()) for layer in adapter.layers for w in layer.weights.values()))
"""


@pytest.mark.parametrize("own", ["own", "views"])
def test_weights_survive_their_file_being_truncated_once_owned(tiny_assets: Assets, tmp_path, own):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_assets.adapters[3].path, adapter)  # rank 64: every module, o/down too
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_assets.model_path), str(adapter), own],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    if own == "own":
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert float(proc.stdout.split()[-1]) != 0.0
    else:  # SGLang's own read alone: the process dies of SIGBUS (what the copy prevents)
        assert proc.returncode == -7, (proc.returncode, proc.stderr[-2000:])
