"""``--chameleon-adapter-dir`` at SGLang's argument resolution: LoRA turned on and the limits the
directory needs filled in where the user left them unset (SGLang's real resolution pipeline,
with our plugin registered; no server)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from chameleon_sglang.dev.assets import Assets
from chameleon_sglang.integration import plugin


def resolved(assets: Assets, *flags: str):
    """The server arguments as resolved (SGLang's view of raw flags plus declared decisions)."""
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.server_args import prepare_server_args

    plugin.register()
    args = prepare_server_args(
        ["--model-path", str(assets.model_path), "--device", "cpu", "--max-total-tokens", "4096"]
        + list(flags)
    )
    args.resolve_once()
    return resolving_view(args)


@pytest.fixture(scope="module")
def adapter_dir(tiny_assets: Assets, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for adapter in tiny_assets.adapters[:4]:  # ranks 8, 16, 32, 64
        shutil.copytree(adapter.path, root / adapter.name)
    (root / "not-an-adapter").mkdir()
    return root


def test_the_directory_alone_turns_lora_on_with_its_largest_rank_and_every_module(
    tiny_assets, adapter_dir
):
    args = resolved(tiny_assets, "--chameleon", "--chameleon-adapter-dir", str(adapter_dir))
    assert args.enable_lora is True
    assert args.max_lora_rank == 64
    assert list(args.lora_target_modules) == ["all"]
    assert args.lora_backend == "chameleon"  # the adapter cache serves


def test_flags_the_user_gave_win(tiny_assets, adapter_dir):
    args = resolved(
        tiny_assets,
        "--chameleon",
        "--chameleon-adapter-dir",
        str(adapter_dir),
        "--max-lora-rank",
        "128",
        "--lora-target-modules",
        "q_proj",
        "v_proj",
    )
    assert args.max_lora_rank == 128 and sorted(args.lora_target_modules) == ["q_proj", "v_proj"]


def test_a_missing_directory_fails_the_launch(tiny_assets, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolved(tiny_assets, "--chameleon", "--chameleon-adapter-dir", str(tmp_path / "nope"))


def test_without_chameleon_the_directory_changes_nothing(tiny_assets, adapter_dir):
    args = resolved(tiny_assets, "--chameleon-adapter-dir", str(adapter_dir))
    assert not args.enable_lora and args.max_lora_rank is None
