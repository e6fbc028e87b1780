"""The gpu-like cost profile (eval.profiles): its ratio from the paper's published figures, the
link rate it implies, adapter bytes in the served dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from eval import profiles


def test_the_ratio_is_the_papers_mean_load_over_an_unloaded_ttft():
    mb_per_rank = 64 / 32  # a rank-32 Llama-7B adapter is 64 MB
    rate = 128 * mb_per_rank / (0.175 * 144)  # MB/ms: rank 128 loads in 17.5% of 144 ms
    mean_load_ms = (sum((8, 16, 32, 64, 128)) / 5) * mb_per_rank / rate
    assert mean_load_ms / 74 == pytest.approx(profiles.GPU_LOAD_OVER_TTFT, abs=5e-4)


def test_the_link_rate_makes_a_mean_load_that_share_of_the_ttft():
    gbps = profiles.host_link_gbps(4e6, 0.05)
    assert 4e6 / (gbps * 1e9) == pytest.approx(profiles.GPU_LOAD_OVER_TTFT * 0.05)
    with pytest.raises(ValueError):
        profiles.host_link_gbps(1.0, 0.0)


def test_adapter_bytes_count_every_weight_in_the_served_dtype(tiny_assets):
    adapter = tiny_assets.adapters[0]
    weights = load_file(f"{adapter.path}/adapter_model.safetensors")
    numel = sum(t.numel() for t in weights.values())
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert profiles.adapter_bytes(adapter, "float32") == 4 * numel
    assert profiles.adapter_bytes(adapter, "bfloat16") == 2 * numel
