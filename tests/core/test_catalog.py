"""The adapter catalog's resolver: names, directories and adapter configs checked before any
weight is read (plain files in a temporary directory, no SGLang)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pytest

from chameleon_sglang.catalog import (
    AdapterRefused,
    AdapterResolver,
    DirectoryResolver,
    check_adapter_name,
    read_adapter_spec,
    refusal_for,
    resolve,
)

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(
    path: Path, rank: int = 8, modules=ALL_MODULES, weights: bool = True, **config
) -> Path:
    path.mkdir(parents=True)
    body = {"peft_type": "LORA", "r": rank, "target_modules": modules, **config}
    (path / "adapter_config.json").write_text(json.dumps(body))
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    write_adapter(root / "good", rank=16, base_model_name_or_path="tiny")
    return root


@pytest.mark.parametrize(
    "name",
    ["", "..", ".", ".hidden", "a/b", "a\\b", "/etc", "x\x00y", "tab\tname", "x" * 256, None, 7],
)
def test_names_that_could_reach_another_path_are_refused(name):
    with pytest.raises(ValueError):
        check_adapter_name(name)


@pytest.mark.parametrize("name", ["a004r128", "tenant-17_adapter.v2", "x" * 255, "日本語"])
def test_plain_names_pass(name):
    assert check_adapter_name(name) == name


def test_a_known_adapter_resolves_to_its_spec(root):
    spec = resolve([DirectoryResolver([root])], "good")
    assert spec is not None
    assert spec.path == (root / "good").resolve() and spec.rank == 16
    assert spec.target_modules == frozenset(ALL_MODULES) and spec.base_model == "tiny"
    assert spec.weights.name == "adapter_model.safetensors"


def test_an_unknown_name_resolves_to_nothing(root):
    assert resolve([DirectoryResolver([root])], "absent") is None


def test_later_roots_are_searched_when_earlier_ones_lack_the_name(root, tmp_path):
    other = tmp_path / "more"
    write_adapter(other / "extra")
    spec = resolve([DirectoryResolver([root, other])], "extra")
    assert spec is not None and spec.path == (other / "extra").resolve()


def test_a_bad_name_is_refused_before_any_resolver_runs(root):
    class Spy(AdapterResolver):
        calls = 0

        def resolve(self, name: str) -> Optional[Path]:
            Spy.calls += 1
            return None

    with pytest.raises(AdapterRefused, match="one path component"):
        resolve([Spy()], "../good")
    assert Spy.calls == 0


def test_a_symlink_out_of_the_directory_is_refused(root, tmp_path):
    outside = write_adapter(tmp_path / "elsewhere" / "secret")
    os.symlink(outside, root / "escape")
    with pytest.raises(AdapterRefused, match="outside"):
        resolve([DirectoryResolver([root])], "escape")


def test_a_symlink_inside_the_directory_is_followed(root):
    os.symlink(root / "good", root / "alias")
    spec = resolve([DirectoryResolver([root])], "alias")
    assert spec is not None and spec.path == (root / "good").resolve()


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.mkdir(), "no adapter_config.json"),
        (lambda p: write_adapter(p, weights=False), "no weight file"),
        (lambda p: write_adapter(p, peft_type="IA3"), "peft_type is not LORA"),
        (lambda p: write_adapter(p, rank=0), "not a positive integer"),
        (lambda p: write_adapter(p, rank="8"), "not a positive integer"),
        (lambda p: write_adapter(p, modules=[]), "no target_modules"),
        (lambda p: (p.mkdir(), (p / "adapter_config.json").write_text("{not json")), "JSON"),
        (lambda p: p.write_text("a file"), "not a directory"),
    ],
)
def test_what_is_not_a_peft_lora_adapter_is_refused_with_the_reason(root, make, words):
    make(root / "bad")
    with pytest.raises(AdapterRefused, match=words):
        resolve([DirectoryResolver([root])], "bad")


def test_a_missing_root_is_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        DirectoryResolver([tmp_path / "nope"])


def test_the_server_refuses_ranks_and_modules_it_does_not_serve(root):
    spec = read_adapter_spec(root / "good")
    assert refusal_for(spec, max_rank=16, served_modules=["all"]) is None
    assert "rank 16 is above" in refusal_for(spec, max_rank=8, served_modules=["all"])
    merged = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert refusal_for(spec, max_rank=64, served_modules=merged) is None
    refused = refusal_for(spec, max_rank=64, served_modules=["qkv_proj", "o_proj"])
    assert "down_proj" in refused and "gate_proj" in refused


def test_directory_listing_names_the_candidates(root):
    (root / ".cache").mkdir()
    write_adapter(root / "b")
    assert DirectoryResolver([root]).names() == ["b", "good"]
