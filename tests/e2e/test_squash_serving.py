"""Opportunistic bypass and squash-and-requeue in a real SGLang server with the adapter cache.

Scenario (tiny model, fp32, static queues, one server):

* ``pin`` (queue 0) runs a long time on rank-128 adapter X, so X stays resident and in use;
  three rank-8 ``filler`` requests (queue 0, lent the empty queues' quota) hold most of the rest
  of the KV pool.
* ``head`` (queue 1: long prompt, rank 128) needs adapter Z, which cannot be placed: the KV
  memory left is less than Z's footprint and every other adapter is in use. Its queue is empty,
  so its quota fits: the paper's bypass case.
* ``young`` (queue 1, younger) uses X, which is resident, and is predicted to finish before any
  running request frees memory: it bypasses the head.
* The pin and the fillers are then aborted (``young`` now keeps X in use). Memory frees before
  ``young`` finishes: the head's adapter and prompt would fit but for the KV ``young`` holds, so
  ``young`` is squashed, requeued behind the head, and the head goes first.

Every request that was not aborted completes, and ``young``'s greedy output equals its output
when run alone.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Dict, List

import pytest
import requests
from conftest import start_server, stop_server

from chameleon_sglang.dev.assets import Assets, build

pytestmark = pytest.mark.slow

ADAPTER_X, ADAPTER_Z, ADAPTER_SMALL = "a004r128", "a009r128", "a000r8"
# name: (prompt tokens, adapter, new tokens). WRS with a 2048-token context and max rank 128:
# pin 0.23 and fillers < 0.125 (queue 0); head 0.28 and young 0.33 (queue 1).
PIN = ("pin", 16, ADAPTER_X, 780)
FILLERS = [(f"filler{i}", 660, ADAPTER_SMALL, 600) for i in range(3)]
HEAD = ("head", 1400, ADAPTER_Z, 16)
YOUNG = ("young", 1400, ADAPTER_X, 200)
# Rank 128 takes 2880 KV slots of the tiny model, rank 8 takes 180. With the pin and fillers
# running, about 2500 slots are left: enough for young's prompt, not for Z.
TOTAL_TOKENS = 7600
EXTRA_ARGS = [
    "--chameleon-scheduler",
    "static",
    "--chameleon-predictor",
    "max-new-tokens",
    # SGLang reserves memory for running requests' future tokens in proportion to this; keep
    # the reservation small so admission depends on the memory actually held.
    "--schedule-conservativeness",
    "0.05",
]
WAIT_S = 120


@pytest.fixture(scope="module")
def assets10() -> Assets:
    return build("tiny", num_adapters=10)


def _ids(name: str, length: int) -> List[int]:
    """A prompt of its own per name (no shared prefix for the radix cache to reuse)."""
    rng = random.Random(name)
    return [rng.randrange(10, 2000) for _ in range(length)]


class Client:
    """Streams requests in threads; records first-token and end times and outputs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.t0 = time.monotonic()
        self.first: Dict[str, float] = {}
        self.end: Dict[str, float] = {}
        self.outputs: Dict[str, List[int]] = {}
        self.errors: Dict[str, str] = {}
        self.threads: List[threading.Thread] = []

    def send(self, name: str, length: int, adapter: str, new_tokens: int) -> None:
        thread = threading.Thread(target=self._stream, args=(name, length, adapter, new_tokens))
        thread.start()
        self.threads.append(thread)

    def _stream(self, name: str, length: int, adapter: str, new_tokens: int) -> None:
        # min_new_tokens fixes the length without ignore_eos, which SGLang would reserve for
        # in full; lengths are then exact and reservations follow --schedule-conservativeness.
        body = {
            "input_ids": _ids(name, length),
            "lora_path": adapter,
            "stream": True,
            "rid": name,
            "sampling_params": {
                "max_new_tokens": new_tokens,
                "min_new_tokens": new_tokens,
                "temperature": 0,
            },
        }
        out: List[int] = []
        try:
            with requests.post(
                self.url + "/generate", json=body, stream=True, timeout=WAIT_S
            ) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith(b"data:") and b"[DONE]" not in line:
                        chunk = json.loads(line[5:])
                        out = chunk["output_ids"]
                        self.first.setdefault(name, time.monotonic() - self.t0)
                        if (
                            chunk["meta_info"].get("finish_reason", {})
                            and chunk["meta_info"]["finish_reason"].get("type") == "abort"
                        ):
                            self.errors[name] = "aborted"
        except requests.RequestException as exc:
            self.errors[name] = repr(exc)
        self.outputs[name] = out
        self.end[name] = time.monotonic() - self.t0

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=WAIT_S)

    def abort(self, name: str) -> None:
        requests.post(self.url + "/abort_request", json={"rid": name}, timeout=30)


def _scheduler_stats(url: str) -> Dict:
    return requests.get(url + "/chameleon/stats", timeout=30).json()["ranks"][0]["scheduler"]


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def run_squash_scenario(url: str) -> Dict:
    client = Client(url)
    client.send(*PIN)
    for filler in FILLERS:
        client.send(*filler)
        time.sleep(0.1)
    _wait_for(
        lambda: all(n in client.first for n in ("pin", *(f[0] for f in FILLERS))),
        "pin and fillers to start",
    )
    before = _scheduler_stats(url)
    client.send(*HEAD)
    _wait_for(
        lambda: _scheduler_stats(url)["num_adapter_misfits"] > before["num_adapter_misfits"],
        "the head to be refused for its adapter",
    )
    client.send(*YOUNG)
    _wait_for(
        lambda: _scheduler_stats(url)["num_bypasses"] > before["num_bypasses"],
        "young to bypass the head",
    )
    at_bypass = time.monotonic() - client.t0
    for name, *_ in (PIN, *FILLERS):  # young now keeps X in use
        client.abort(name)
    client.join()
    return {
        "client": client,
        "before": before,
        "after": _scheduler_stats(url),
        "at_bypass": at_bypass,
    }


@pytest.fixture(scope="module")
def squash_run(assets10, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("squash-logs")
    srv = start_server(
        assets10,
        log_dir,
        "squash",
        chameleon=True,
        max_total_tokens=TOTAL_TOKENS,
        extra_args=EXTRA_ARGS,
    )
    try:
        result = run_squash_scenario(srv.url)
        name, length, adapter, new_tokens = YOUNG
        body = {
            "input_ids": _ids(name, length),
            "lora_path": adapter,
            "sampling_params": {
                "max_new_tokens": new_tokens,
                "temperature": 0,
                "min_new_tokens": new_tokens,
            },
        }
        resp = requests.post(srv.url + "/generate", json=body, timeout=WAIT_S)
        resp.raise_for_status()
        result["young_alone"] = resp.json()["output_ids"]
        result["final"] = _scheduler_stats(srv.url)
    finally:
        stop_server(srv)
    return result


def test_young_request_bypasses_a_head_whose_adapter_cannot_be_placed(squash_run):
    """The head fitted its quota but not its adapter; a younger request with a resident adapter
    went first (bypass), before the head produced anything."""
    client = squash_run["client"]
    assert squash_run["after"]["num_bypasses"] > squash_run["before"]["num_bypasses"]
    assert client.first["young"] < client.first["head"]


def test_bypass_is_squashed_when_memory_frees_first_and_the_head_goes_first(squash_run):
    """Memory freed (fillers aborted) before the bypass request finished: it was squashed and
    requeued behind the head, which then started before the squashed request finished."""
    client = squash_run["client"]
    after, before = squash_run["after"], squash_run["before"]
    assert after["num_squashes"] > before["num_squashes"], after
    assert after["num_retractions"] == before["num_retractions"]  # a squash is not a retraction
    assert client.first["head"] < client.end["young"]


def test_every_request_completes_and_squash_loses_nothing(squash_run):
    """Requests that were not aborted complete with their full length; the squashed request's
    greedy output equals its output when run alone; every charge was returned."""
    client = squash_run["client"]
    for name, _, _, new_tokens in (HEAD, YOUNG):
        assert name not in client.errors, client.errors
        assert len(client.outputs[name]) == new_tokens, name
    assert client.outputs["young"] == squash_run["young_alone"]
    final = squash_run["final"]
    assert final["num_running"] == 0 and sum(final["num_waiting"]) == 0
    assert final["usage"] == [0] * final["num_queues"]
