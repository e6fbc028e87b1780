"""Built-in assets: deterministic, cached by recipe, adapters of the promised shape."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from chameleon_sglang.dev.assets import ADAPTER_RANKS, TARGET_MODULES, build, recipe_for


def tree_digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    return build("tiny", num_adapters=6, cache_dir=tmp_path_factory.mktemp("a"))


def test_same_recipe_same_bytes(small_build, tmp_path):
    """Two builds of one recipe on different paths are byte-identical."""
    other = build("tiny", num_adapters=6, cache_dir=tmp_path)
    assert other.root.name == small_build.root.name
    assert tree_digest(other.root) == tree_digest(small_build.root)


def test_existing_build_is_reused(small_build):
    """A complete build is returned as is, without rewriting anything."""
    mtimes = {p: p.stat().st_mtime_ns for p in small_build.root.rglob("*")}
    again = build("tiny", num_adapters=6, cache_dir=small_build.root.parent)
    assert again == small_build
    assert {p: p.stat().st_mtime_ns for p in small_build.root.rglob("*")} == mtimes


def test_recipe_change_gives_a_new_build():
    """Changing the recipe changes the build's directory (rebuilt only then)."""
    assert recipe_for("tiny", 6).digest() != recipe_for("tiny", 7).digest()
    assert recipe_for("tiny").digest() != recipe_for("eval").digest()


def test_adapters_cover_ranks_and_all_modules(small_build):
    """Adapters take ranks from {8..128} and target every attention and MLP projection."""
    ranks = [a.rank for a in small_build.adapters]
    assert set(ranks) == set(ADAPTER_RANKS)
    for adapter in small_build.adapters:
        cfg = json.loads((Path(adapter.path) / "adapter_config.json").read_text())
        assert cfg["r"] == adapter.rank
        assert set(cfg["target_modules"]) == set(TARGET_MODULES)
        assert cfg["base_model_name_or_path"] is None


def test_lora_b_is_nonzero_and_adapters_differ(small_build):
    """B matrices are non-zero, so each adapter changes the model differently."""
    from safetensors.torch import load_file

    seen = set()
    for adapter in small_build.adapters:
        tensors = load_file(str(Path(adapter.path) / "adapter_model.safetensors"))
        b = [t for k, t in tensors.items() if "lora_B" in k]
        assert b and all(float(t.abs().sum()) > 0 for t in b)
        seen.add(hashlib.sha256(b"".join(t.numpy().tobytes() for t in b)).hexdigest())
    assert len(seen) == len(small_build.adapters)


def test_model_loads_and_tokenizer_round_trips(small_build):
    """The model directory is a loadable HF Llama with a working tokenizer and chat template."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(small_build.model_path)
    assert cfg.model_type == "llama" and cfg.vocab_size == 2048
    tok = AutoTokenizer.from_pretrained(small_build.model_path)
    text = "Kari tomu nes 1234."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_unknown_preset_is_refused():
    """An unknown preset name is a clear error."""
    with pytest.raises(ValueError, match="unknown preset"):
        recipe_for("huge")


def test_builds_are_cached_at_the_project_root(monkeypatch):
    """Without ``CHAMELEON_ASSETS_DIR`` builds go to ``.cache/assets`` beside ``Makefile`` (where
    ``make clean`` removes them), never inside the package."""
    from chameleon_sglang.dev.assets import default_cache_dir

    monkeypatch.delenv("CHAMELEON_ASSETS_DIR", raising=False)
    root = Path(__file__).resolve().parents[2]
    assert (root / "Makefile").is_file()
    assert default_cache_dir() == root / ".cache" / "assets"


def test_an_extra_adapter_is_what_peft_writes_also_with_embedding_lora(small_build, tmp_path):
    """``write_adapter`` writes peft's keys (embedding LoRA included) with the seeded values,
    without building a peft model per adapter; the catalog preset is the eval model with a
    thousand adapters of ranks 8-64."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    from chameleon_sglang.dev.assets import PRESETS, write_adapter

    out = tmp_path / "emb"
    write_adapter(small_build.model_path, out, rank=8, seed=3,
                  target_modules=("q_proj", "embed_tokens"))  # fmt: skip
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any("lora_embedding_A" in k for k in keys) and any(".lora_A." in k for k in keys)
    base = LlamaForCausalLM.from_pretrained(small_build.model_path)
    PeftModel.from_pretrained(base, out)  # peft reads it back
    assert PRESETS["catalog"].num_adapters == 1000 and PRESETS["catalog"].ranks == (8, 16, 32, 64)
