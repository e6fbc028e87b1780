"""``--chameleon`` and its sub-options as an SGLang server-argument namespace.

SGLang assembles ``ServerArgs`` from msgspec namespaces (``srt/arg_groups/fields``); patch 0005
appends the namespaces returned by :func:`chameleon_input_namespaces`, so the options appear in
``--help``, in ``/server_info`` and in the ``chameleon`` config bag like SGLang's own. The typed,
frozen view used by our components is :class:`chameleon_sglang.config.ChameleonConfig`.
"""

from __future__ import annotations

import argparse
from typing import List, Literal, Optional

import msgspec
from sglang.srt.arg_groups.arg_utils import A, Arg


def _default(value: object) -> str:
    return f"(default: {value})"


class Chameleon(msgspec.Struct):
    """Namespace ``chameleon``."""

    _NS_PATH = "chameleon"

    chameleon: A[
        bool,
        "Enable Chameleon (MICRO'25): multi-level-queue scheduling by Weighted Request Size and an "
        "elastic adapter cache in idle KV memory. Which components are active is logged at start "
        "and reported under `chameleon_status` in /server_info.",
    ] = False
    chameleon_scheduler: A[
        Literal["dynamic", "static", "off"],
        "Chameleon scheduler: 'dynamic' (K-means queues refreshed periodically), 'static' (4 "
        "equal-range queues, equal quotas) or 'off' (SGLang's own admission; ablation). "
        + _default("dynamic"),
    ] = "dynamic"
    chameleon_max_queues: A[
        int, "Largest number of queues K (K-means over recent WRS, K = 1..max). " + _default(4)
    ] = 4
    chameleon_refresh_period: A[
        float, "Seconds between re-fits of the queue cut-offs and quotas. " + _default(300.0)
    ] = 300.0
    chameleon_warmup_requests: A[
        int, "Requests observed before the first queue fit. " + _default(200)
    ] = 200
    chameleon_elbow_threshold: A[
        float,
        "Elbow rule: the smallest K whose next step improves WCSS by less than this fraction. "
        + _default(0.2),
    ] = 0.2
    chameleon_wrs_weights: A[
        List[float],
        Arg(
            help="Weighted Request Size weights of input and predicted output length: "
            "WRS = (w_in*in/max_in + w_out*out/max_out) * rank/max_rank. " + _default("0.4 0.6"),
            nargs=2,
        ),
    ] = msgspec.field(default_factory=lambda: [0.4, 0.6])
    chameleon_ttft_slo: A[
        float, "TTFT target in seconds for the M/M/1 minimum queue quotas. " + _default(5.0)
    ] = 5.0
    chameleon_bypass: A[
        bool,
        Arg(
            help="Opportunistic bypass: a younger request whose adapter is resident may pass a "
            "head request whose adapter cannot be placed. " + _default("on"),
            action=argparse.BooleanOptionalAction,
        ),
    ] = True
    chameleon_predictor: A[
        Literal["online", "max-new-tokens", "synthetic"],
        "Output-length predictor: 'online' (per adapter and input-length bucket, from observed "
        "outputs), 'max-new-tokens' (the request's cap) or 'synthetic' (the cap with "
        "--chameleon-predictor-accuracy, else a wrong value: for sensitivity experiments). "
        + _default("online"),
    ] = "online"
    chameleon_predictor_accuracy: A[
        float, "Share of right predictions of the 'synthetic' predictor. " + _default(1.0)
    ] = 1.0
    chameleon_cache: A[
        bool,
        Arg(
            help="Elastic adapter cache in idle KV memory; --no-chameleon-cache keeps SGLang's "
            "fixed LoRA slots (ablation). " + _default("on"),
            action=argparse.BooleanOptionalAction,
        ),
    ] = True
    chameleon_eviction_policy: A[
        Literal["chameleon", "lru", "fairshare", "gdsf"],
        "Adapter-cache eviction: 'chameleon' (score 0.45 freq + 0.10 recency + 0.45 size), "
        "'lru', 'fairshare' (equal weights) or 'gdsf'. " + _default("chameleon"),
    ] = "chameleon"
    chameleon_score_weights: A[
        List[float],
        Arg(
            help="Eviction score weights (frequency recency size) of the 'chameleon' policy. "
            + _default("0.45 0.10 0.45"),
            nargs=3,
        ),
    ] = msgspec.field(default_factory=lambda: [0.45, 0.10, 0.45])
    chameleon_frequency_window: A[
        float, "Sliding window in seconds for adapter use frequency. " + _default(300.0)
    ] = 300.0
    chameleon_prefetch: A[
        bool,
        Arg(
            help="Prefetch the adapters of queued requests into the cache. " + _default("on"),
            action=argparse.BooleanOptionalAction,
        ),
    ] = True
    chameleon_prefetch_policy: A[
        Literal["queue", "predictive"],
        "What prefetch loads: 'queue' (adapters of the next queued requests) or 'predictive' "
        "(those too, then adapters whose next request an arrival-gap histogram predicts now, "
        "into free memory only). " + _default("queue"),
    ] = "queue"
    chameleon_adapter_dir: A[
        List[str],
        Arg(
            help="Adapter directories: a request naming an adapter that is not registered is "
            "served from DIR/<name>/ (a PEFT LoRA adapter) without a restart, also without "
            "--lora-paths. Names are one plain path component; nothing outside DIR is read. "
            "--max-lora-rank (if unset: the largest rank found there) and --lora-target-modules "
            "(if unset: all) bound what is served. " + _default("none"),
            nargs="+",
        ),
    ] = msgspec.field(default_factory=list)
    chameleon_adapter_read_workers: A[
        int,
        "Worker threads that read adapters from disk off the scheduler loop (running requests "
        "keep decoding during a read); 0 reads in the loop, as SGLang does. " + _default(2),
    ] = 2
    chameleon_adapter_read_timeout: A[
        float,
        "Seconds an adapter read may take; a read past it fails that adapter's load only "
        "(a hung disk or mount). " + _default(120.0),
    ] = 120.0
    chameleon_host_cache_gb: A[
        Optional[float],
        "Host-memory budget of loaded adapters (GB): past it, adapters neither pinned nor in "
        "use are unloaded by the cache's eviction score (frequency, recency, size) and read "
        "again on their next request. " + _default("a quarter of the RAM available at start"),
    ] = None
    chameleon_host_link_gbps: A[
        float,
        "Host-link model for CPU machines: every host-to-device adapter copy takes at least "
        "bytes / (this many GB/s), in SGLang's LoRA pool and in the adapter cache alike, with or "
        "without --chameleon. 0 turns it off. " + _default(0.0),
    ] = 0.0
    chameleon_dp_epsilon: A[
        float,
        "With --dp-size N and --load-balance-method chameleon: no replica takes a request while "
        "its load is above (1 + this) times the mean replica load. " + _default(0.25),
    ] = 0.25
    chameleon_dp_miss_cost: A[
        float,
        "With --dp-size N and --load-balance-method chameleon: a replica that does not hold the "
        "request's adapter counts as this many mean requests more loaded (0: least loaded "
        "first, residency breaks ties only). " + _default(4.0),
    ] = 4.0
    chameleon_dp_slack: A[
        float,
        "With --dp-size N and --load-balance-method chameleon: room beyond the load bound, in "
        "mean requests (a replica takes a request while its load is at most (1 + epsilon) x "
        "mean + this many mean requests). " + _default(1.0),
    ] = 1.0


CHAMELEON_LOAD_BALANCE_METHOD = "chameleon"


def chameleon_input_namespaces() -> list:
    """The namespaces SGLang's ``ServerArgs`` should include (called by patch 0005). Also adds
    ``chameleon`` to ``--load-balance-method``'s choices (adapter-affinity dispatch across
    data-parallel replicas, ``chameleon_sglang.dp``)."""
    add_load_balance_method_choice()
    return [Chameleon]


def add_load_balance_method_choice() -> None:
    """Add ``chameleon`` to the choices of SGLang's ``--load-balance-method`` (idempotent).

    SGLang's field modules use string annotations, which every ``get_type_hints`` evaluates
    afresh; so the evaluated annotation, with the choice added, replaces the string (SGLang
    collects the fields and builds the parser after this runs)."""
    import typing

    from sglang.srt.arg_groups.fields.parallel import Parallel

    name = "load_balance_method"
    hint = typing.get_type_hints(Parallel, include_extras=True)[name]
    for meta in getattr(hint, "__metadata__", ()):
        choices = getattr(meta, "choices", None)
        if isinstance(choices, list) and CHAMELEON_LOAD_BALANCE_METHOD not in choices:
            choices.append(CHAMELEON_LOAD_BALANCE_METHOD)
    Parallel.__annotations__[name] = hint
