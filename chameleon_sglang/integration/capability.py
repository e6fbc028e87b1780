"""Can the adapter cache be the LoRA pool here? One decision, made from flags and model facts.

The same function answers at argument resolution (flags only: the model is not loaded yet) and
in each model-runner process just before the LoRA manager is built (flags plus the loaded model's
facts). Where it says no, SGLang's own LoRA pool and kernels serve, the log says why once, and
``/server_info`` publishes the reason; nothing raises. The facts are the ones the KV-cache binding
needs, so a configuration that passes here binds (the binding re-checks them as invariants).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from chameleon_sglang.config import ChameleonConfig

logger = logging.getLogger(__name__)

STOCK_POOL = "SGLang's LoRA pool in use"
CHAMELEON_LORA_BACKEND = "chameleon"
"""The LoRA backend name under which SGLang builds the adapter cache's pool and kernels."""
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head"})
"""Target modules whose LoRA weights the adapter cache does not store (such adapters are
refused at load)."""


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the loaded model implies for the KV cache (from SGLang's own model runner)."""

    lora_dtype: torch.dtype
    kv_cache_dtype: torch.dtype
    attention_arch: str  # SGLang's AttentionArch name: "MHA", "MLA", "SSM", ...
    hybrid_swa: bool = False  # sliding-window layers beside full ones (two KV pools)
    recurrent_state: bool = False  # mamba / linear attention state beside the KV cache
    moe_lora: bool = False  # the model has fused-MoE layers
    padded_for_tp: str = ""  # what SGLang padded so CPU tensor parallelism divides ("": nothing)


def resolved(server_args: Any) -> Any:
    """``server_args`` as SGLang resolved them: the raw flags under every decision resolution
    declared (``--enable-lora`` turned on by ``--lora-paths`` or an adapter directory, backends
    picked, ...). Child processes receive the raw record with the declarations beside it."""
    from sglang.srt.arg_groups.overrides import resolved_view

    return resolved_view(server_args)


def parallelism_unsupported_reason(cfg: Any) -> Optional[str]:
    """Why SGLang's parallelism in these flags rules Chameleon out (None: it does not). One rule
    for the scheduler, the adapter cache and adapter-affinity dispatch."""
    if getattr(cfg, "enable_dp_attention", False):
        return "not supported with DP attention (--enable-dp-attention)"
    if int(getattr(cfg, "pp_size", 1) or 1) > 1:
        return "not supported with pipeline parallelism (--pp-size > 1)"
    if str(getattr(cfg, "disaggregation_mode", None) or "null") != "null":
        return "not supported with prefill/decode disaggregation (--disaggregation-mode)"
    return None


def flags_unsupported_reason(cfg: Any) -> Optional[str]:
    """Why the flags alone rule the adapter cache out (None: they allow it)."""
    config = ChameleonConfig.from_server_args(cfg)
    if not config.enabled:
        return "--chameleon not set: SGLang's LoRA pool"
    if not config.cache:
        return "disabled by --no-chameleon-cache: SGLang's LoRA pool"
    if not (getattr(cfg, "enable_lora", False) or getattr(cfg, "lora_paths", None)):
        return "LoRA is not enabled"
    parallelism = parallelism_unsupported_reason(cfg)
    checks = (
        ((getattr(cfg, "page_size", 1) or 1) != 1, "needs --page-size 1"),
        (parallelism is not None, parallelism),
        (
            getattr(cfg, "enable_lora_overlap_loading", False),
            "not combined with --enable-lora-overlap-loading",
        ),
        (
            getattr(cfg, "enable_hierarchical_cache", False),
            "not combined with --enable-hierarchical-cache (host KV copies do not know adapter "
            "slots)",
        ),
        (
            getattr(cfg, "speculative_algorithm", None) not in (None, "", "NONE"),
            "not combined with speculative decoding (the draft model has its own KV pool)",
        ),
    )
    for failed, why in checks:
        if failed:
            return f"{why}: {STOCK_POOL}"
    return None


def model_unsupported_reason(facts: ModelFacts) -> Optional[str]:
    """Why the loaded model rules the adapter cache out (None: it allows it)."""
    if facts.moe_lora:
        return f"stores dense LoRA modules only (the model has MoE layers): {STOCK_POOL}"
    if facts.attention_arch != "MHA":
        return (
            f"needs per-layer K/V buffers (the model's attention is "
            f"{facts.attention_arch}): {STOCK_POOL}"
        )
    if facts.hybrid_swa or facts.recurrent_state:
        kind = "sliding-window" if facts.hybrid_swa else "recurrent-state"
        return f"needs one full-attention KV pool (the model has {kind} layers): {STOCK_POOL}"
    if facts.padded_for_tp:
        return (
            f"needs layers that tensor parallelism divides unpadded (SGLang padded "
            f"{facts.padded_for_tp} for CPU tensor parallelism; the adapters' slices would "
            f"not match): {STOCK_POOL}"
        )
    if facts.kv_cache_dtype != facts.lora_dtype:
        return (
            f"needs the KV cache in the LoRA dtype ({_name(facts.lora_dtype)}; the KV cache "
            f"is {_name(facts.kv_cache_dtype)}): {STOCK_POOL}"
        )
    return None


def unsupported_reason(cfg: Any, facts: Optional[ModelFacts] = None) -> Optional[str]:
    """The decision: flags first, then the model's facts when known."""
    return flags_unsupported_reason(cfg) or (
        model_unsupported_reason(facts) if facts is not None else None
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- the decision in a model-runner process ----------------------------------------------------
@dataclasses.dataclass
class RunnerDecision:
    """This process's decision, taken before its LoRA manager is built."""

    reason: Optional[str] = None
    fallback_backend: Optional[str] = None  # the LoRA backend SGLang's pool runs with

    @property
    def cache_serves(self) -> bool:
        """The adapter cache is this process's LoRA pool."""
        return self.reason is None


_decision = RunnerDecision(reason="no LoRA manager built in this process")


def runner_decision() -> RunnerDecision:
    return _decision


def model_facts(runner: Any) -> ModelFacts:
    """The facts of ``runner`` (an SGLang ``ModelRunner`` with its model loaded)."""
    from sglang.srt.lora.mem_pool import LoRAMemoryPool
    from sglang.srt.mem_cache.kv_cache_builder import uses_ssm_state

    config = runner.model_config
    runner.configure_kv_cache_dtype()  # SGLang's own resolution; it runs again after LoRA
    arch = getattr(config, "attention_arch", None)
    return ModelFacts(
        lora_dtype=runner.dtype,
        kv_cache_dtype=runner.kv_cache_dtype,
        attention_arch=str(getattr(arch, "name", arch or "MHA")),
        hybrid_swa=bool(getattr(config, "is_hybrid_swa", False)),
        recurrent_state=bool(uses_ssm_state(config)),
        moe_lora=LoRAMemoryPool._has_moe_module(runner.model),
        padded_for_tp=_padded_for_tp(getattr(config, "hf_config", None)),
    )


# (attribute SGLang keeps the original value in, attribute it pads) for CPU tensor parallelism
_TP_PADDED = (
    ("original_intermediate_size", "intermediate_size"),
    ("original_num_attention_heads", "num_attention_heads"),
    ("original_total_num_kv_heads", "num_key_value_heads"),
)


def _padded_for_tp(hf_config: Any) -> str:
    """What ``adjust_config_with_unaligned_cpu_tp`` padded, e.g. ``intermediate_size 352->384``."""
    padded = []
    for original, current in _TP_PADDED:
        before, after = getattr(hf_config, original, None), getattr(hf_config, current, None)
        if before is not None and after is not None and before != after:
            padded.append(f"{current} {before}->{after}")
    return ", ".join(padded)


def stock_backend_for(device: str) -> str:
    """The LoRA backend SGLang's pool serves with when the cache steps aside."""
    return "torch_native" if device == "cpu" else "csgmv"


def decide_for_runner(runner: Any, cfg: Any, chosen_backend: Optional[str]) -> RunnerDecision:
    """Take this process's decision. ``chosen_backend``: the LoRA backend argument resolution
    picked; only a ``chameleon`` pick can need a fallback."""
    global _decision
    if chosen_backend != CHAMELEON_LORA_BACKEND:
        _decision = RunnerDecision(
            reason=flags_unsupported_reason(cfg) or f"LoRA backend {chosen_backend!r}: {STOCK_POOL}"
        )
        return _decision
    reason = unsupported_reason(cfg, model_facts(runner))
    fallback = None
    if reason is not None:
        fallback = stock_backend_for(str(getattr(runner, "device", None) or "cuda"))
        logger.warning("Chameleon adapter cache off: %s; LoRA backend %r", reason, fallback)
    _decision = RunnerDecision(reason=reason, fallback_backend=fallback)
    return _decision
