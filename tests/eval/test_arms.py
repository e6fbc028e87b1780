"""Every arm runs the same launch command; only the arm's own flags differ."""

from __future__ import annotations

from pathlib import Path

from eval_factories import make_adapters

from chameleon_sglang.dev.assets import PRESETS, Assets
from eval.arms import ARM_FLAGS, ServerFlags, arm_command, auto_dtype


def fake_assets() -> Assets:
    return Assets(
        root=Path("/nowhere"),
        preset="eval",
        recipe=PRESETS["eval"],
        adapters=tuple(make_adapters(100)),
    )


def test_arms_share_the_command():
    assets, flags = fake_assets(), ServerFlags()
    names = [a.name for a in assets.adapters]
    stock = arm_command("stock", assets, 1234, names, flags)
    assert "--chameleon" not in stock
    for arm, own in ARM_FLAGS.items():
        cmd = arm_command(arm, assets, 1234, names, flags)
        assert cmd[: len(stock)] == stock and cmd[len(stock) :] == list(own)


def test_baseline_server_flags():
    assets = fake_assets()
    cmd = arm_command("stock", assets, 1234, [a.name for a in assets.adapters], ServerFlags())
    joined = " ".join(cmd)
    for part in (
        "--max-total-tokens 65536",
        "--max-lora-rank 128",
        "--max-loras-per-batch 8",
        "--max-loaded-loras 100",
        "--dtype bfloat16",
        "--host 127.0.0.1",
    ):
        assert part in joined
    assert len(cmd[cmd.index("--lora-paths") + 1 :]) >= 100


def test_auto_dtype_follows_cpu_flags(tmp_path):
    with_bf16 = tmp_path / "a"
    with_bf16.write_text("flags\t: fpu avx2 avx512f avx512_bf16\n")
    without = tmp_path / "b"
    without.write_text("flags\t: fpu avx2 avx512f avx512_vnni\n")
    assert auto_dtype(with_bf16) == "bfloat16"
    assert auto_dtype(without) == "float32"
    assert auto_dtype(tmp_path / "missing") == "float32"
