"""One memory budget for every arm (eval.memory_budget): slot bytes against SGLang's own LoRA
pool, allocated for real, for the tiny model; each arm's share of the budget; the tuning's
largest feasible slot count. The served side (a stock server started with the cut KV pool) is
in test_compare_smoke."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sglang.srt.lora.mem_pool import LoRAMemoryPool
from sglang.srt.runtime_context import get_parallel

from eval import memory_budget as mb
from eval.arms import ServerFlags, arm_command
from eval.runner import InfeasibleArm, RunConfig, infeasible_arms, max_slots, planned_command

ALL = set(mb.LLAMA_ALL_TARGETS)


def real_pool_bytes(model_dir, targets, rank, slots, dtype) -> int:
    """Bytes SGLang's ``LoRAMemoryPool`` really allocates (CPU tensors) for the model."""
    config = mb.load_hf_config(model_dir)
    model = torch.nn.Module()
    model.config = config
    model.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))
    with get_parallel().override(tp_size=1, tp_rank=0, attn_tp_size=1):
        pool = LoRAMemoryPool(config, slots, getattr(torch, dtype), rank, targets, model, "lru", 0)
    tensors = [t for b in (pool.A_buffer, pool.B_buffer) for layers in b.values() for t in layers]
    for b in (
        pool.embedding_A_buffer,
        pool.embedding_B_buffer,
        pool.lm_head_A_buffer,
        pool.lm_head_B_buffer,
    ):
        tensors += list(b.values())
    assert all(t.device.type == "cpu" for t in tensors)
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize(
    "targets, rank, slots, dtype",
    [
        (ALL, 128, 8, "float32"),
        ({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, 64, 3, "bfloat16"),
        ({"qkv_proj"}, 8, 1, "float16"),
    ],
)
def test_slot_bytes_are_what_sglangs_pool_allocates(tiny_assets, targets, rank, slots, dtype):
    model_dir = tiny_assets.model_path
    config = mb.load_hf_config(model_dir)
    expected = real_pool_bytes(model_dir, targets, rank, slots, dtype)
    assert mb.slot_bytes(config, targets, rank, slots, dtype) == expected


def test_linear_slot_bytes_by_hand(tiny_assets):
    """A ``[slots, rank * stack, in]`` and B ``[slots, out, rank]`` per layer, by hand."""
    c = mb.load_hf_config(tiny_assets.model_path)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    h, inter, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * hd
    qkv = 16 * 3 * h + (c.num_attention_heads * hd + 2 * kv) * 16
    down = 16 * inter + h * 16
    expected = 2 * c.num_hidden_layers * (qkv + down) * 4
    assert mb.slot_bytes(c, {"qkv_proj", "down_proj"}, 16, 2, "float32") == expected
    assert mb.kv_bytes_per_token(c, "bfloat16") == 2 * c.num_hidden_layers * kv * 2


BUDGET = 65536
FLAGS = ServerFlags(dtype="float32", max_total_tokens=BUDGET)


def commands(assets, flags=FLAGS):
    names = [a.name for a in assets.adapters]
    stock = arm_command("stock", assets, 1, names, flags)
    chameleon = arm_command("chameleon", assets, 1, names, flags)
    no_cache = arm_command("scheduler-only", assets, 1, names, flags)
    return stock, chameleon, no_cache


def test_every_arm_gets_the_same_total_memory(tiny_assets):
    stock, chameleon, no_cache = commands(tiny_assets)
    s, c, n = (mb.arm_memory(cmd, BUDGET, 100) for cmd in (stock, chameleon, no_cache))
    per_token = c.kv_bytes_per_token
    assert c.kv_tokens == BUDGET and c.slot_bytes == 0  # adapters live in the KV pool
    assert s.slot_bytes > 0 and s.kv_tokens < BUDGET and n == s  # SGLang's slots: KV cut
    assert 0 <= c.total_bytes - s.total_bytes < per_token  # equal, to within one token
    config = mb.load_hf_config(tiny_assets.model_path)
    assert s.slot_bytes == mb.slot_bytes(config, ALL, tiny_assets.max_rank, 8, "float32")


def test_an_arm_whose_slots_leave_too_little_kv_is_infeasible(tiny_assets):
    stock, _, _ = commands(tiny_assets)
    most = mb.max_feasible_slots(stock, BUDGET, 600)
    assert most > 8
    fits = mb.arm_memory(mb.with_flag(stock, "--max-loras-per-batch", str(most)), BUDGET, 600)
    over = mb.arm_memory(mb.with_flag(stock, "--max-loras-per-batch", str(most + 1)), BUDGET, 600)
    assert fits.feasible and fits.kv_tokens >= 600
    assert not over.feasible and "the longest request needs 600" in over.reason


def test_target_modules_and_rank_come_from_the_command_as_sglang_reads_it(tiny_assets):
    stock, _, _ = commands(tiny_assets)
    config = mb.load_hf_config(tiny_assets.model_path)
    assert mb.target_modules_of(stock, config) == ALL  # the shared command says 'all'
    fitted = stock + ["--lora-target-modules", "q_proj", "v_proj", "down_proj"]
    assert mb.target_modules_of(fitted, config) == {"qkv_proj", "down_proj"}
    without = mb.with_flag(stock, "--lora-target-modules", "x")[:-2]
    ranks = [
        json.loads((Path(a.path) / "adapter_config.json").read_text())["r"]
        for a in tiny_assets.adapters
    ]
    assert mb.target_modules_of(without, config) == mb.adapter_target_modules(
        [a.path for a in tiny_assets.adapters]
    )
    assert mb.max_rank_of(mb.with_flag(stock, "--max-lora-rank", "8")[:-2]) == max(ranks)


def test_with_flag_leaves_exactly_one_value():
    cmd = ["x", "--max-total-tokens", "5", "--a", "--max-total-tokens=6"]
    assert mb.with_kv_tokens(cmd, 7) == ["x", "--a", "--max-total-tokens", "7"]
    assert mb.flag_value(cmd, "--max-total-tokens") == "6"
    assert mb.flag_values(["--lora-paths", "a=1", "b=2", "--x"], "--lora-paths") == ["a=1", "b=2"]


def test_planned_commands_under_each_budget(tiny_assets):
    cfg = RunConfig(tiny_assets, tuple(tiny_assets.adapters), FLAGS, min_kv_tokens=600)
    stock, memory = planned_command("stock", cfg, 4321)
    assert mb.flag_value(stock, "--max-total-tokens") == str(memory["kv_tokens"])
    assert memory["budget"] == "equal" and memory["kv_tokens"] < BUDGET
    chameleon, memory = planned_command("chameleon", cfg, 4321)
    assert (
        mb.flag_value(chameleon, "--max-total-tokens") == str(BUDGET) and memory["slot_bytes"] == 0
    )
    as_is = RunConfig(
        cfg.assets, cfg.adapters, ServerFlags("float32", BUDGET, memory_budget="as-is")
    )
    stock, memory = planned_command("stock", as_is, 4321)
    assert mb.flag_value(stock, "--max-total-tokens") == str(BUDGET) and memory == {
        "budget": "as-is"
    }
    most = max_slots(cfg, ("--max-loras-per-batch", "1"))
    greedy = RunConfig(
        cfg.assets,
        cfg.adapters,
        cfg.flags,
        arm_flags={"stock-tuned": ("--max-loras-per-batch", str(most + 1))},
        min_kv_tokens=600,
    )
    with pytest.raises(InfeasibleArm, match="stock-tuned"):
        planned_command("stock-tuned", greedy, 4321)
    assert list(infeasible_arms(["stock", "stock-tuned", "chameleon"], greedy)) == ["stock-tuned"]
