"""The adapter-cache capability decision: one row per setting of the README's table.

Flags rows are decided the same way at argument resolution and in the model runner; model rows
need the loaded model, so only the runner decides them. Where the answer is no, the ``chameleon``
LoRA backend name resolves to SGLang's own backend (SGLang's pool serves).
"""

from __future__ import annotations

import types

import pytest
import torch
from config_factories import server_args

from chameleon_sglang.integration import capability
from chameleon_sglang.integration.capability import ModelFacts, unsupported_reason
from chameleon_sglang.integration.hooks import lora as lora_hooks


def flags(**overrides):
    base = dict(
        enable_lora=True,
        lora_paths=None,
        page_size=1,
        enable_dp_attention=False,
        enable_lora_overlap_loading=False,
        pp_size=1,
        enable_hierarchical_cache=False,
        speculative_algorithm=None,
    )
    base.update(overrides)
    return server_args(**base)


def facts(**overrides):
    base = dict(lora_dtype=torch.bfloat16, kv_cache_dtype=torch.bfloat16, attention_arch="MHA")
    base.update(overrides)
    return ModelFacts(**base)


def test_a_dense_mha_model_with_kv_in_the_lora_dtype_is_served_by_the_cache():
    assert unsupported_reason(flags(), facts()) is None
    assert unsupported_reason(flags(), None) is None


FLAG_ROWS = {
    "--page-size 16": (dict(page_size=16), "--page-size 1"),
    "--enable-dp-attention": (dict(enable_dp_attention=True), "DP attention"),
    "--enable-lora-overlap-loading": (dict(enable_lora_overlap_loading=True), "overlap"),
    "--pp-size 2": (dict(pp_size=2), "pipeline"),
    "--enable-hierarchical-cache": (dict(enable_hierarchical_cache=True), "hierarchical"),
    "--speculative-algorithm EAGLE": (dict(speculative_algorithm="EAGLE"), "speculative"),
    "--no-chameleon-cache": (dict(chameleon_cache=False), "--no-chameleon-cache"),
    "no LoRA": (dict(enable_lora=False), "LoRA is not enabled"),
}


@pytest.mark.parametrize("row", sorted(FLAG_ROWS))
def test_flag_rows_rule_the_cache_out_with_their_reason(row):
    overrides, words = FLAG_ROWS[row]
    reason = unsupported_reason(flags(**overrides), facts())
    assert reason is not None and words in reason
    assert reason == unsupported_reason(flags(**overrides), None)  # same without the model


MODEL_ROWS = {
    "MoE": (dict(moe_lora=True), "MoE"),
    "MLA": (dict(attention_arch="MLA"), "MLA"),
    "hybrid sliding window": (dict(hybrid_swa=True), "sliding-window"),
    "mamba / linear attention": (dict(recurrent_state=True), "recurrent-state"),
    "--tp-size 2 on a CPU that pads the model": (
        dict(padded_for_tp="intermediate_size 352->384"),
        "352->384",
    ),
    "--kv-cache-dtype fp8_e4m3": (dict(kv_cache_dtype=torch.float8_e4m3fn), "float8_e4m3fn"),
    "--dtype float32 --kv-cache-dtype bf16": (
        dict(lora_dtype=torch.float32, kv_cache_dtype=torch.bfloat16),
        "bfloat16",
    ),
}


@pytest.mark.parametrize("row", sorted(MODEL_ROWS))
def test_model_rows_rule_the_cache_out_with_their_reason(row):
    overrides, words = MODEL_ROWS[row]
    reason = unsupported_reason(flags(), facts(**overrides))
    assert reason is not None and words in reason and "SGLang's LoRA pool" in reason
    assert unsupported_reason(flags(), None) is None  # flags alone cannot know


class FakeRunner:
    """What ``model_facts`` reads of SGLang's ModelRunner, for a dense fp32 Llama."""

    def __init__(self, device: str, kv_dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = torch.float32
        self._kv_dtype = kv_dtype
        self.model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        self.model_config = types.SimpleNamespace(
            attention_arch=types.SimpleNamespace(name="MHA"),
            is_hybrid_swa=False,
            hf_config=types.SimpleNamespace(architectures=["LlamaForCausalLM"]),
        )

    def configure_kv_cache_dtype(self) -> None:
        self.kv_cache_dtype = self._kv_dtype


def test_tp_padding_is_read_from_what_sglang_records():
    padded = types.SimpleNamespace(
        original_intermediate_size=352,
        intermediate_size=384,
        original_num_attention_heads=4,
        num_attention_heads=4,
    )
    assert capability._padded_for_tp(padded) == "intermediate_size 352->384"
    assert capability._padded_for_tp(types.SimpleNamespace(intermediate_size=352)) == ""


@pytest.fixture
def restore_decision():
    saved = capability.runner_decision()
    yield
    capability._decision = saved


@pytest.mark.parametrize("device, backend", [("cpu", "torch_native"), ("cuda", "csgmv")])
def test_runner_falls_back_to_sglangs_backend_for_its_device(
    device, backend, restore_decision, monkeypatch
):
    monkeypatch.setattr("sglang.srt.mem_cache.kv_cache_builder.uses_ssm_state", lambda c: False)
    decision = capability.decide_for_runner(
        FakeRunner(device, torch.bfloat16), flags(), capability.CHAMELEON_LORA_BACKEND
    )
    assert decision.fallback_backend == backend
    assert "KV cache in the LoRA dtype" in decision.reason

    from sglang.srt.lora.backend.lora_registry import LORA_SUPPORTED_BACKENDS, get_backend_from_name

    lora_hooks.register_lora_backend()
    assert LORA_SUPPORTED_BACKENDS[capability.CHAMELEON_LORA_BACKEND]() is get_backend_from_name(
        backend
    )


def test_runner_keeps_the_cache_when_the_model_allows_it(restore_decision, monkeypatch):
    monkeypatch.setattr("sglang.srt.mem_cache.kv_cache_builder.uses_ssm_state", lambda c: False)
    decision = capability.decide_for_runner(
        FakeRunner("cpu", torch.float32), flags(), capability.CHAMELEON_LORA_BACKEND
    )
    assert decision.reason is None and decision.fallback_backend is None
    from chameleon_sglang.integration.lora_backend import ChameleonLoRABackend

    lora_hooks.register_lora_backend()
    from sglang.srt.lora.backend.lora_registry import LORA_SUPPORTED_BACKENDS

    assert LORA_SUPPORTED_BACKENDS[capability.CHAMELEON_LORA_BACKEND]() is ChameleonLoRABackend


def test_a_stock_backend_choice_never_falls_back(restore_decision):
    decision = capability.decide_for_runner(
        FakeRunner("cpu", torch.bfloat16), flags(page_size=16), "torch_native"
    )
    assert decision.fallback_backend is None and "--page-size 1" in decision.reason
