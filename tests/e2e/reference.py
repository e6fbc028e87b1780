"""Greedy reference outputs from HF transformers + peft (fp32), computed in the test process."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from chameleon_sglang.dev.assets import Assets

NUM_NEW_TOKENS = 16
PROMPTS = (
    "Once upon a time there was",
    "The quick brown fox jumps over",
    "Kari tomu nes solavi deporex",
    "1234 and 5678 are numbers; what",
)


def prompt_ids(assets: Assets) -> List[List[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_path)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def greedy(model, ids: Sequence[int], num_new: int = NUM_NEW_TOKENS) -> List[int]:
    """Plain greedy decoding, recomputing the full sequence each step (no EOS stop)."""
    seq = torch.tensor([list(ids)])
    out: List[int] = []
    with torch.no_grad():
        for _ in range(num_new):
            logits = model(input_ids=seq).logits[0, -1]
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


def reference_outputs(
    assets: Assets, adapter_paths: Dict[Optional[str], Optional[str]], prompts: List[List[int]]
) -> Dict[Tuple[Optional[str], int], List[int]]:
    """``{(adapter name or None, prompt index): greedy output ids}``."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    results: Dict[Tuple[Optional[str], int], List[int]] = {}
    for name, path in adapter_paths.items():
        model = LlamaForCausalLM.from_pretrained(assets.model_path, torch_dtype=torch.float32)
        if path is not None:
            model = PeftModel.from_pretrained(model, Path(path))
        model.eval()
        for i, ids in enumerate(prompts):
            results[(name, i)] = greedy(model, ids)
    return results
