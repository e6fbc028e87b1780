"""Built-in model and LoRA adapters, made offline and deterministically from a seed.

No model hub is reachable from our machines, so the default model is a small Llama with random
weights and a byte-level BPE tokenizer trained locally on a seeded synthetic corpus, plus N LoRA
adapters written with ``peft`` (ranks from {8,16,32,64,128}, every attention and MLP projection,
non-zero ``B`` so that adapters really differ).

Contract: ``build(preset)`` returns an :class:`Assets` describing a directory that holds
``model/`` (HF format, safetensors), ``adapters/<name>/`` (peft format) and ``manifest.json``.
The directory name carries a hash of the recipe; an existing complete build is reused, so a build
happens once per recipe and machine. Same recipe, same bytes.

CLI: ``python -m chameleon_sglang.dev.assets [--preset tiny|eval] [--adapters N] [--print-dir]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

RECIPE_VERSION = 1
ADAPTER_RANKS: Tuple[int, ...] = (8, 16, 32, 64, 128)
TARGET_MODULES: Tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines the bytes of a build."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    num_adapters: int
    ranks: Tuple[int, ...] = ADAPTER_RANKS
    lora_b_std: float = 0.05
    seed: int = 0
    version: int = RECIPE_VERSION

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def adapter_rank(self, index: int) -> int:
        """Ranks cycle through ``ranks``: equal counts of each rank."""
        return self.ranks[index % len(self.ranks)]


# hidden, intermediate, layers, heads, KV heads, vocabulary, max positions, adapters
_SHAPES: Dict[str, Tuple[int, ...]] = {
    # Tests: builds in seconds, serves with fp32 exactness against HF + peft.
    "tiny": (128, 352, 2, 4, 2, 2048, 2048, 8),
    # Evaluation: the shape of the measured baseline (13.7 M parameters, 100 adapters of
    # 1.2-19 MB each), so that loading an adapter is not free.
    "eval": (512, 1376, 4, 8, 4, 2048, 4096, 100),
}
PRESETS: Dict[str, Recipe] = {name: Recipe(*shape) for name, shape in _SHAPES.items()}


# The adapter catalog: the eval model with a thousand adapters of ranks 8-64 (~4 GB on disk),
# served from a directory (``--chameleon-adapter-dir``) or pre-registered (stock).
PRESETS["catalog"] = dataclasses.replace(PRESETS["eval"], num_adapters=1000, ranks=(8, 16, 32, 64))

# Tensor parallelism on the CPU: tiny with an intermediate size TP=2 divides without the padding
# SGLang's CPU engine adds otherwise (a padded model runs on SGLang's LoRA pool).
PRESETS["tiny-tp"] = dataclasses.replace(PRESETS["tiny"], intermediate_size=384, num_adapters=4)


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    name: str
    rank: int
    path: str


@dataclasses.dataclass(frozen=True)
class Assets:
    """A complete build on disk."""

    root: Path
    preset: str
    recipe: Recipe
    adapters: Tuple[AdapterInfo, ...]

    @property
    def model_path(self) -> Path:
        return self.root / "model"

    @property
    def max_rank(self) -> int:
        return max(a.rank for a in self.adapters) if self.adapters else 0

    def lora_paths_args(self) -> List[str]:
        """``NAME=PATH`` items for SGLang's ``--lora-paths``."""
        return [f"{a.name}={a.path}" for a in self.adapters]

    def adapter(self, name: str) -> AdapterInfo:
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(f"no adapter named {name!r} in {self.root}")


PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package runs from (``chameleon_sglang/dev/`` is two levels below it)."""


def default_cache_dir() -> Path:
    """``$CHAMELEON_ASSETS_DIR``, else ``.cache/assets`` at the project root."""
    env = os.environ.get("CHAMELEON_ASSETS_DIR")
    if env:
        return Path(env)
    return PROJECT_ROOT / ".cache" / "assets"


def recipe_for(preset: str, num_adapters: int | None = None) -> Recipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    recipe = PRESETS[preset]
    if num_adapters is not None:
        if num_adapters < 0:
            raise ValueError("number of adapters must be >= 0")
        recipe = dataclasses.replace(recipe, num_adapters=num_adapters)
    return recipe


def build(
    preset: str = "tiny", num_adapters: int | None = None, cache_dir: Path | None = None
) -> Assets:
    """Return the build for ``preset``, making it first if it is not on disk yet."""
    recipe = recipe_for(preset, num_adapters)
    root = (cache_dir or default_cache_dir()) / f"{preset}-{recipe.digest()}"
    if (root / "manifest.json").is_file():
        return load(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        _write_build(staging, preset, recipe, final_root=root)
        try:
            staging.rename(root)
        except OSError:
            # Another process finished the same build first; both are identical.
            if not (root / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load(root)


def load(root: Path) -> Assets:
    manifest = json.loads((root / "manifest.json").read_text())
    recipe_fields = dict(manifest["recipe"])
    recipe_fields["ranks"] = tuple(recipe_fields["ranks"])
    adapters = tuple(
        AdapterInfo(name=a["name"], rank=a["rank"], path=str(root / "adapters" / a["name"]))
        for a in manifest["adapters"]
    )
    return Assets(
        root=root, preset=manifest["preset"], recipe=Recipe(**recipe_fields), adapters=adapters
    )


def adapter_name(index: int, rank: int) -> str:
    return f"a{index:03d}r{rank}"


def _write_build(staging: Path, preset: str, recipe: Recipe, final_root: Path) -> None:
    import torch

    torch.manual_seed(recipe.seed)
    tokenizer = _train_tokenizer(recipe)
    model = _make_model(recipe, tokenizer)
    model.save_pretrained(staging / "model", safe_serialization=True)
    tokenizer.save_pretrained(staging / "model")
    adapters = []
    templates: Dict[int, _AdapterTemplate] = {}
    for i in range(recipe.num_adapters):
        rank = recipe.adapter_rank(i)
        name = adapter_name(i, rank)
        if rank not in templates:
            templates[rank] = _AdapterTemplate.of(model, rank, TARGET_MODULES)
        templates[rank].write(recipe, i, staging / "adapters" / name)
        adapters.append({"name": name, "rank": rank})
    manifest = {
        "preset": preset,
        "recipe": dataclasses.asdict(recipe),
        "digest": recipe.digest(),
        "adapters": adapters,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


_SYLLABLES = (
    "ka ri to mu ne so la vi de po an el is or um ex qu st pr th ch sh a e i o u y ing ed er ly "
    "tion ment ness able ful less"
).split()


def _corpus(seed: int, num_lines: int = 4000) -> List[str]:
    """Seeded pseudo-text: words from syllables, Zipf-ish word reuse, digits and punctuation."""
    rng = random.Random(seed)
    lexicon = [
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)
    ]
    weights = [1.0 / (r + 1) for r in range(len(lexicon))]
    lines = []
    for _ in range(num_lines):
        words = rng.choices(lexicon, weights=weights, k=rng.randint(4, 24))
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 9999)))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", ",", "?", "!", ";", ":"]))
    return lines


_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _train_tokenizer(recipe: Recipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(recipe.seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=_CHAT_TEMPLATE,
        model_max_length=recipe.max_position_embeddings,
    )


def _make_model(recipe: Recipe, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def write_adapter(
    model_path: Path,
    out: Path,
    rank: int,
    seed: int,
    lora_b_std: float = 0.05,
    target_modules: Sequence[str] = TARGET_MODULES,
):
    """Write one extra peft adapter of ``rank`` for the model at ``model_path`` (tests, tools)."""
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_path)
    recipe = dataclasses.replace(PRESETS["tiny"], seed=seed, lora_b_std=lora_b_std)
    _write_adapter(base, recipe, index=0, rank=rank, out=out, target_modules=target_modules)


def _write_adapter(
    base_model,
    recipe: Recipe,
    index: int,
    rank: int,
    out: Path,
    target_modules: Sequence[str] = TARGET_MODULES,
) -> None:
    _AdapterTemplate.of(base_model, rank, target_modules).write(recipe, index, out)


def _lora_kind(param_name: str) -> Optional[str]:
    """ "A" or "B" for a peft LoRA parameter (linear or embedding), None for anything else."""
    for kind in ("A", "B"):
        if f".lora_{kind}." in param_name or f".lora_embedding_{kind}." in param_name:
            return kind
    return None


@dataclasses.dataclass(frozen=True)
class _AdapterTemplate:
    """What ``peft`` writes for one rank of one model, made once: the adapter's config and
    its LoRA parameters (in ``named_parameters`` order, sorted). :meth:`write` fills them with
    an adapter's seeded values and writes the file ``save_pretrained`` would write, byte for
    byte, without building a peft model per adapter (a catalog of a thousand in seconds)."""

    config_json: str
    params: Tuple[Tuple[str, Tuple[int, ...], str], ...]
    """(saved key, shape, "A" or "B") of each LoRA parameter, in peft's sorted name order."""

    @staticmethod
    def of(base_model, rank: int, target_modules: Sequence[str]) -> _AdapterTemplate:
        import copy

        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            lora_dropout=0.0,
            target_modules=list(target_modules),
            init_lora_weights=False,
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(copy.deepcopy(base_model), config)
        params = []
        for name, param in sorted(peft_model.named_parameters()):
            kind = _lora_kind(name)
            if kind is not None:  # saved without the adapter's name ("default")
                params.append((re.sub(r"\.default(?=\.|$)", "", name), tuple(param.shape), kind))
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
            cfg = json.loads((Path(tmp) / "adapter_config.json").read_text())
            from safetensors import safe_open

            with safe_open(str(Path(tmp) / "adapter_model.safetensors"), "pt") as saved:
                if sorted(saved.keys()) != sorted(p[0] for p in params):
                    raise RuntimeError("peft saved other keys than the template expects")
        # peft records the absolute base-model path it was given; keep the build relocatable.
        cfg["base_model_name_or_path"] = None
        cfg["target_modules"] = sorted(cfg["target_modules"])  # peft writes a set's order
        return _AdapterTemplate(json.dumps(cfg, indent=2, sort_keys=True) + "\n", tuple(params))

    def write(self, recipe: Recipe, index: int, out: Path) -> None:
        """The adapter of ``index``: A ~ N(0, 1/fan_in), B ~ N(0, lora_b_std^2), seeded."""
        import torch
        from safetensors.torch import save_file

        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + index + 1)
        tensors = {}
        for key, shape, kind in self.params:
            values = torch.randn(shape, generator=gen)
            tensors[key] = values / shape[1] ** 0.5 if kind == "A" else values * recipe.lora_b_std
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(self.config_json)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--adapters", type=int, default=None, help="number of adapters")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--print-dir", action="store_true", help="print only the build directory")
    args = parser.parse_args(argv)
    assets = build(args.preset, args.adapters, args.cache_dir)
    if args.print_dir:
        print(assets.root)
    else:
        print(f"model:    {assets.model_path}")
        print(f"adapters: {len(assets.adapters)} (max rank {assets.max_rank}) in {assets.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
