"""Bad input gets a clear error and loses nothing: the server stays healthy and correct."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from client import generate, generate_stream, integrity_problems

from chameleon_sglang.dev.assets import Assets, write_adapter
from chameleon_sglang.dev.serve import served_model_name

pytestmark = pytest.mark.slow

PROMPT = [11, 12, 13, 14, 15, 16]


@pytest.fixture(scope="session")
def rank_256_adapter(tiny_assets: Assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rank256") / "r256"
    write_adapter(tiny_assets.model_path, out, rank=256, seed=7)
    return out


@pytest.fixture(scope="session")
def embedding_lora_adapter(tiny_assets: Assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedding-lora") / "emb-r8"
    write_adapter(
        tiny_assets.model_path,
        out,
        rank=8,
        seed=11,
        target_modules=("q_proj", "v_proj", "embed_tokens"),
    )
    return out


def assert_still_serving(url: str) -> None:
    """The server answers generation as before and its invariants hold (no ``/health`` here:
    SGLang's health check sleeps a whole second before it looks, and the generations below are
    a stricter check)."""
    assert integrity_problems(url) == []
    first = generate(url, PROMPT, "a000r8", 4)["output_ids"]
    assert len(first) == 4
    assert generate(url, PROMPT, "a000r8", 4)["output_ids"] == first


def served_models(url: str) -> list[tuple[str, str]]:
    """(id, root) of every model /v1/models lists, sorted; 'created' is the time of the request
    itself, so it is left out."""
    data = requests.get(url + "/v1/models", timeout=30).json()["data"]
    return sorted((m["id"], str(m.get("root"))) for m in data)


def test_unknown_adapter_native(server):
    """/generate with an adapter that was never loaded: HTTP 400 naming it."""
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4}, "lora_path": "nope"}
    resp = requests.post(server.url + "/generate", json=body, timeout=60)
    assert resp.status_code == 400
    assert "nope" in resp.text and "never been loaded" in resp.text
    assert_still_serving(server.url)


def test_unknown_adapter_openai(server, tiny_assets):
    """/v1/completions with 'base:unknown': HTTP 400 naming the adapter."""
    body = {"model": f"{served_model_name(tiny_assets)}:nope", "prompt": PROMPT, "max_tokens": 4}
    resp = requests.post(server.url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400
    assert "nope" in resp.text
    assert_still_serving(server.url)


def test_adapter_rank_above_max_is_refused(server, rank_256_adapter):
    """Loading an adapter whose rank exceeds --max-lora-rank fails with a message saying so."""
    before = served_models(server.url)
    resp = requests.post(
        server.url + "/load_lora_adapter",
        json={"lora_name": "too-big", "lora_path": str(rank_256_adapter)},
        timeout=120,
    )
    body = resp.json()
    assert body["success"] is False
    assert "rank" in body["error_message"].lower()
    assert served_models(server.url) == before
    assert_still_serving(server.url)


def test_adapter_with_embedding_lora_is_refused_alone(server, embedding_lora_adapter):
    """An adapter with LoRA on the embedding: with the adapter cache its load fails naming why
    and the others serve on; stock SGLang's pool serves it (and unloads it again)."""

    def model_ids() -> list:
        return sorted(
            m["id"] for m in requests.get(server.url + "/v1/models", timeout=30).json()["data"]
        )

    before = model_ids()
    resp = requests.post(
        server.url + "/load_lora_adapter",
        json={"lora_name": "with-embedding", "lora_path": str(embedding_lora_adapter)},
        timeout=120,
    )
    body = resp.json()
    use = requests.post(
        server.url + "/generate",
        timeout=60,
        json={
            "input_ids": PROMPT,
            "sampling_params": {"max_new_tokens": 2},
            "lora_path": "with-embedding",
        },
    )
    if server.arm == "stock":  # (at --max-loaded-loras SGLang may drop an idle adapter)
        assert body["success"] is True and use.status_code == 200, (body, use.text)
        assert "with-embedding" in model_ids()
        assert requests.post(
            server.url + "/unload_lora_adapter", timeout=120, json={"lora_name": "with-embedding"}
        ).json()["success"]
        assert "with-embedding" not in model_ids()
    else:
        assert body["success"] is False
        assert "embed_tokens" in body["error_message"], body
        assert use.status_code == 400
        assert model_ids() == before
    assert_still_serving(server.url)


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b'{"input_ids": "abc", "sampling_params": {}}', b"[1, 2, 3]"],
    ids=["malformed-json", "wrong-type", "not-an-object"],
)
def test_malformed_request(server, payload):
    """A malformed /generate body is a 4xx error, not a crash."""
    resp = requests.post(
        server.url + "/generate",
        data=payload,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert 400 <= resp.status_code < 500, resp.text
    assert_still_serving(server.url)


def test_client_disconnect_mid_stream(server):
    """A client that hangs up mid-stream does not disturb the server or later requests."""
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True},
        "lora_path": "a002r32",
        "stream": True,
    }
    with requests.post(server.url + "/generate", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith(b"data:"):
                break  # got a first chunk; leave and close the connection
    assert_still_serving(server.url)
    chunks = generate_stream(server.url, PROMPT, "a002r32", 8)
    assert len(chunks[-1]["output_ids"]) == 8


@pytest.mark.parametrize("bad_id", [-1, "vocab"])
@pytest.mark.parametrize("api", ["native", "openai"])
def test_token_id_outside_the_vocabulary_is_refused(server, tiny_assets, bad_id, api):
    """A prompt of token ids with one outside [0, vocab): HTTP 400 naming it (on a GPU such an
    id would be a device-side assert in the embedding), and the server serves on."""
    token = _vocab_of(tiny_assets) if bad_id == "vocab" else bad_id
    if api == "native":
        resp = requests.post(
            server.url + "/generate",
            timeout=60,
            json={
                "input_ids": [*PROMPT, token],
                "sampling_params": {"max_new_tokens": 4},
                "lora_path": "a000r8",
            },
        )
    else:
        resp = requests.post(
            server.url + "/v1/completions",
            timeout=60,
            json={
                "model": f"{served_model_name(tiny_assets)}:a000r8",
                "prompt": [*PROMPT, token],
                "max_tokens": 4,
            },
        )
    assert resp.status_code == 400, resp.text
    assert str(token) in resp.text and "vocabulary" in resp.text
    assert_still_serving(server.url)


@pytest.mark.parametrize(
    "input_ids", [[PROMPT, []], [[]]], ids=["batch-with-an-empty-prompt", "batch-of-one-empty"]
)
def test_an_empty_prompt_in_a_batch_is_refused(server, input_ids):
    """A batch holding an empty input_ids passes SGLang's own check (it only looks at the
    batch), gets scheduled, and its scheduler dies on an assertion when the prefill's KV is
    released (found by API fuzzing, stock and chameleon alike): HTTP 400 instead."""
    body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 1}}
    resp = requests.post(server.url + "/generate", timeout=60, json=body)
    assert resp.status_code == 400, resp.text
    assert "prompt is empty" in resp.text
    assert_still_serving(server.url)


@pytest.mark.parametrize("lora_path", [["a000r8"], ["a000r8", "a001r16"]], ids=["one", "two"])
def test_one_prompt_with_a_lora_path_that_is_not_a_name_is_refused(server, lora_path):
    """A single prompt whose lora_path is a list stopped the server (the scheduler's request
    constructor failed on it; found by API fuzzing, stock too): HTTP 400 saying what it must be."""
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}, "lora_path": lora_path}
    resp = requests.post(server.url + "/generate", timeout=60, json=body)
    assert resp.status_code == 400, resp.text
    assert "lora_path" in resp.text and "one adapter name" in resp.text
    assert_still_serving(server.url)


def test_more_top_logprobs_than_the_vocabulary_has_are_refused(server):
    """top_logprobs_num above the vocabulary size made the scheduler's topk fail and stopped
    the server (found by API fuzzing, stock too): HTTP 400 naming the field instead."""
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 2},
        "lora_path": "a000r8",
        "return_logprob": True,
        "top_logprobs_num": 10**6,
    }
    resp = requests.post(server.url + "/generate", timeout=60, json=body)
    assert resp.status_code == 400, resp.text
    assert "top_logprobs_num" in resp.text
    assert_still_serving(server.url)


@pytest.mark.parametrize("api", ["native", "openai"])
def test_top_k_beyond_int32_is_refused(server, tiny_assets, api):
    """top_k = 2**31 passes SGLang's own check and then overflows the scheduler's int32 batch
    tensor, which stops the whole server (found by API fuzzing, stock and chameleon alike):
    HTTP 400 naming top_k instead, and the server serves on."""
    if api == "native":
        url, body = (
            "/generate",
            {
                "input_ids": PROMPT,
                "sampling_params": {"max_new_tokens": 4, "top_k": 2**31},
                "lora_path": "a000r8",
            },
        )
    else:
        url, body = (
            "/v1/completions",
            {
                "model": f"{served_model_name(tiny_assets)}:a000r8",
                "prompt": PROMPT,
                "max_tokens": 4,
                "top_k": 2**31,
            },
        )
    resp = requests.post(server.url + url, timeout=60, json=body)
    assert resp.status_code == 400, resp.text
    assert "top_k" in resp.text and str(2**31 - 1) in resp.text
    assert_still_serving(server.url)


def _vocab_of(assets: Assets) -> int:
    import json

    return int(json.loads((Path(assets.model_path) / "config.json").read_text())["vocab_size"])
