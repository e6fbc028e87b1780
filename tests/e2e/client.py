"""Small HTTP helpers for tests against a real server on loopback."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import requests

TIMEOUT_S = 120


def generate(url: str, ids: List[int], adapter: Optional[str], num_new: int) -> Dict[str, Any]:
    body: Dict[str, Any] = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": num_new, "temperature": 0, "ignore_eos": True},
    }
    if adapter is not None:
        body["lora_path"] = adapter
    resp = requests.post(url + "/generate", json=body, timeout=TIMEOUT_S)
    resp.raise_for_status()
    return resp.json()


def generate_stream(url: str, ids: List[int], adapter: Optional[str], num_new: int) -> List[dict]:
    """All streamed chunks of a streaming ``/generate``, in order (``[DONE]`` excluded)."""
    body: Dict[str, Any] = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": num_new, "temperature": 0, "ignore_eos": True},
        "stream": True,
    }
    if adapter is not None:
        body["lora_path"] = adapter
    chunks = []
    with requests.post(url + "/generate", json=body, stream=True, timeout=TIMEOUT_S) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line or not line.startswith(b"data:"):
                continue
            payload = line[len(b"data:") :].strip()
            if payload == b"[DONE]":
                break
            chunks.append(json.loads(payload))
    return chunks


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def integrity_problems(url: str, settle_s: float = 5.0) -> List[str]:
    """The Chameleon invariant checker's findings on every scheduler of the server (servers of
    the test suite run with ``CHAMELEON_CHECK_INTEGRITY=1``); [] for a stock server. Waits up
    to ``settle_s`` for a clean result: a request that just ended may still be settling."""
    import time

    deadline = time.monotonic() + settle_s
    while True:
        ranks = requests.get(url + "/chameleon/stats", timeout=30).json().get("ranks", [])
        problems = [p for rank in ranks for p in (rank or {}).get("integrity", [])]
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.25)
