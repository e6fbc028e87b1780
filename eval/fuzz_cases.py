"""Requests for API fuzzing: schema-generated (schemathesis) and near-valid (hostile values in
otherwise well-formed requests). Both are deterministic for a seed, so two servers receive the
same requests in the same order.

A :class:`FuzzRequest` is plain data (method, path, query, JSON body or raw bytes): the runner
sends it with ``requests`` to any base URL, and the report prints it as a one-line repro.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any, Dict, List, Optional, Sequence

ADMIN_PATHS = frozenset(
    {"/load_lora_adapter", "/unload_lora_adapter", "/flush_cache", "/abort_request"}
)
"""SGLang's ``ADMIN_OPTIONAL`` routes among the fuzzed ones: with ``--admin-api-key`` they take
only the admin key."""

FUZZED_OPERATIONS = (
    ("POST", "/generate"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/load_lora_adapter"),
    ("POST", "/unload_lora_adapter"),
    ("POST", "/abort_request"),
    ("POST", "/flush_cache"),
    ("GET", "/v1/loads"),
    ("GET", "/chameleon/stats"),
)
"""Generation (native and OpenAI), adapter lifecycle, and what the gateway and operators read."""

NEGATIVE_OPERATIONS = frozenset(
    {"/generate", "/load_lora_adapter", "/unload_lora_adapter", "/v1/loads"}
)
"""Operations that also get schema-*invalid* requests; schemathesis needs minutes to make
invalid instances of the OpenAI request schemas, whose near-valid requests come from
:func:`near_valid_requests` instead."""


@dataclasses.dataclass
class FuzzRequest:
    method: str
    path: str
    source: str  # "schema+", "schema-" (invalid by the schema) or "near-valid"
    query: Dict[str, Any] = dataclasses.field(default_factory=dict)
    json_body: Any = None
    raw_body: Optional[bytes] = None
    content_type: Optional[str] = None

    @property
    def admin(self) -> bool:
        return self.path in ADMIN_PATHS

    @property
    def operation(self) -> str:
        return f"{self.method} {self.path}"

    def adapter_names(self) -> List[str]:
        """Adapter names the request would unload (used to keep the probe's adapter)."""
        body = self.json_body if isinstance(self.json_body, dict) else {}
        name = body.get("lora_name")
        return [name] if isinstance(name, str) else []

    def repro(self) -> str:
        body = self.raw_body.decode(errors="backslashreplace") if self.raw_body else None
        if body is None and self.json_body is not None:
            body = json.dumps(self.json_body)[:400]
        query = f"?{self.query}" if self.query else ""
        return f"{self.method} {self.path}{query} {body or ''}".strip()


def schema_requests(openapi: Dict[str, Any], per_operation: int, seed: int) -> List[FuzzRequest]:
    """``per_operation`` schema-valid requests per fuzzed operation (and as many invalid ones for
    :data:`NEGATIVE_OPERATIONS`), from the server's own OpenAPI document."""
    from schemathesis import openapi as st_openapi
    from schemathesis.generation import GenerationMode

    schema = st_openapi.from_dict(openapi)
    out: List[FuzzRequest] = []
    for method, path in FUZZED_OPERATIONS:
        if path not in openapi.get("paths", {}):
            continue
        modes = [GenerationMode.POSITIVE]
        if path in NEGATIVE_OPERATIONS:
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            strategy = schema[path][method].as_strategy(generation_mode=mode)
            source = "schema+" if mode == GenerationMode.POSITIVE else "schema-"
            out.extend(_from_case(c, source) for c in _draw(strategy, per_operation, seed))
    return out


def _draw(strategy: Any, n: int, seed: int) -> List[Any]:
    """Up to ``n`` examples of a hypothesis strategy, the same ones for the same seed."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    drawn: List[Any] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn[:n]


def _from_case(case: Any, source: str) -> FuzzRequest:
    kwargs = case.as_transport_kwargs(base_url="http://x")
    path = kwargs["url"][len("http://x") :]
    headers = {k.lower(): v for k, v in (kwargs.get("headers") or {}).items()}
    raw = kwargs.get("data")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    return FuzzRequest(
        method=kwargs["method"].upper(),
        path=path,
        source=source,
        query=dict(kwargs.get("params") or {}),
        json_body=kwargs.get("json"),
        raw_body=raw,
        content_type=headers.get("content-type"),
    )


HOSTILE_NAMES = (
    "",
    "..",
    "../a000r8",
    "/etc/passwd",
    "a000r8/../../x",
    ".hidden",
    "a\x00b",
    "a\\b",
    "nope",
    "x" * 4096,
    "\ud800",
    " a000r8",
    "A000R8",
)
EDGE_INTS = (-(2**63), -1, 0, 1, 2, 7, 2**31, 10**9)
EDGE_FLOATS = (-1.0, 0.0, 1e-9, 0.5, 1.0, 2.0, 1e30)


def near_valid_requests(
    n: int, seed: int, adapters: Sequence[str], model: str, vocab: int
) -> List[FuzzRequest]:
    """``n`` well-formed requests with hostile values: adapter names (registered, unknown, path
    tricks, NUL, huge), sampling edge values, token ids outside the vocabulary, batches whose
    adapter list does not match, and lifecycle calls with paths outside any adapter directory."""
    rng = random.Random(seed)
    makers = (_native, _completion, _chat, _lifecycle)
    return [rng.choice(makers)(rng, adapters, model, vocab) for _ in range(n)]


def _adapter(rng: random.Random, adapters: Sequence[str]) -> Any:
    pick = rng.random()
    if pick < 0.45:
        return rng.choice(list(adapters))
    if pick < 0.55:
        return None
    if pick < 0.9:
        return rng.choice(HOSTILE_NAMES)
    return rng.choice([7, ["a000r8"], {"name": "a000r8"}, True])


def _sampling(rng: random.Random) -> Dict[str, Any]:
    params: Dict[str, Any] = {"max_new_tokens": rng.choice((1, 4, 8))}
    for key, values in (
        ("max_new_tokens", EDGE_INTS + ("4", None)),
        ("temperature", EDGE_FLOATS),
        ("top_p", EDGE_FLOATS),
        ("top_k", EDGE_INTS),
        ("min_p", EDGE_FLOATS),
        ("n", (0, 1, 2, -1)),
        ("stop", ("", ["\x00"], [""] * 3)),
        ("ignore_eos", (True, False, "yes")),
        ("repetition_penalty", EDGE_FLOATS),
        ("json_schema", ("{", '{"type": "object"}')),
        ("regex", ("(", "[a-z]+")),
    ):
        if rng.random() < 0.25:
            params[key] = rng.choice(values)
    return params


def _prompt_ids(rng: random.Random, vocab: int) -> Any:
    pick = rng.random()
    if pick < 0.7:
        return [rng.randrange(vocab) for _ in range(rng.randint(1, 24))]
    return rng.choice(([], [vocab], [-1], [0.5], [[1, 2], [3]], "12"))


def _native(rng: random.Random, adapters: Sequence[str], model: str, vocab: int) -> FuzzRequest:
    body: Dict[str, Any] = {"sampling_params": _sampling(rng)}
    if rng.random() < 0.3:
        size = rng.randint(1, 3)
        body["input_ids"] = [_prompt_ids(rng, vocab) for _ in range(size)]
        body["lora_path"] = [_adapter(rng, adapters) for _ in range(rng.choice((size, size + 1)))]
    else:
        body["input_ids"] = _prompt_ids(rng, vocab)
        adapter = _adapter(rng, adapters)
        if adapter is not None:
            body["lora_path"] = adapter
    if rng.random() < 0.3:
        body["stream"] = True
    if rng.random() < 0.2:
        body["return_logprob"] = True
        body["top_logprobs_num"] = rng.choice((0, 5, 10**6))
    if rng.random() < 0.1:
        body["rid"] = rng.choice(("dup", "", "x" * 1000))
    return FuzzRequest("POST", "/generate", "near-valid", json_body=body)


def _openai_model(rng: random.Random, adapters: Sequence[str], model: str) -> str:
    adapter = _adapter(rng, adapters)
    pick = rng.random()
    if pick < 0.2:
        return model
    if pick < 0.3:
        return f"{model}:"
    if pick < 0.4:
        return f"other-model:{adapters[0]}"
    return f"{model}:{adapter}" if isinstance(adapter, str) else model


def _completion(rng: random.Random, adapters: Sequence[str], model: str, vocab: int) -> FuzzRequest:
    body: Dict[str, Any] = {
        "model": _openai_model(rng, adapters, model),
        "prompt": rng.choice((_prompt_ids(rng, vocab), "hello", "")),
        "max_tokens": rng.choice((1, 4, 0, -1, 10**9)),
    }
    if rng.random() < 0.3:
        body["stream"] = True
    if rng.random() < 0.2:
        body["lora_path"] = _adapter(rng, adapters)
    if rng.random() < 0.2:
        body["n"] = rng.choice((1, 2, 0))
    if rng.random() < 0.2:
        body["logprobs"] = rng.choice((0, 5, 100))
    return FuzzRequest("POST", "/v1/completions", "near-valid", json_body=body)


def _chat(rng: random.Random, adapters: Sequence[str], model: str, vocab: int) -> FuzzRequest:
    content = rng.choice(("hi", "", None, [{"type": "text", "text": "hi"}], 5))
    body: Dict[str, Any] = {
        "model": _openai_model(rng, adapters, model),
        "messages": rng.choice(([{"role": "user", "content": content}], [], [{"role": "x"}])),
        "max_tokens": rng.choice((1, 4, 0, -1)),
    }
    if rng.random() < 0.3:
        body["stream"] = True
    return FuzzRequest("POST", "/v1/chat/completions", "near-valid", json_body=body)


def _lifecycle(rng: random.Random, adapters: Sequence[str], model: str, vocab: int) -> FuzzRequest:
    pick = rng.random()
    if pick < 0.4:
        name = rng.choice(HOSTILE_NAMES + ("fuzz-extra",))
        path = rng.choice(("/", "/etc", "/proc/self", "/nonexistent", "", "../", "\x00"))
        return FuzzRequest(
            "POST",
            "/load_lora_adapter",
            "near-valid",
            json_body={"lora_name": name, "lora_path": path},
        )
    if pick < 0.7:
        name = rng.choice(HOSTILE_NAMES + ("fuzz-extra",))
        return FuzzRequest(
            "POST", "/unload_lora_adapter", "near-valid", json_body={"lora_name": name}
        )
    if pick < 0.85:
        return FuzzRequest(
            "POST",
            "/abort_request",
            "near-valid",
            json_body={"rid": rng.choice(("", "dup", "nope")), "abort_all": rng.random() < 0.2},
        )
    model_id = rng.choice((model, f"{model}:{adapters[0]}", "../x", "nope"))
    return FuzzRequest("GET", f"/v1/models/{model_id}", "near-valid")
