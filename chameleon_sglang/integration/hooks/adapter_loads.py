"""Adapter loads that never stall the scheduler loop (scheduler process, ``--chameleon``).

SGLang answers a ``LoadLoRAAdapterReqInput`` inside its event loop: ``LoRAManager`` reads the
weights from disk there, and every running request's decode waits for the read. Here:

1. :func:`defer_adapter_load` (around ``Scheduler.load_lora_adapter``) hands the read to a
   worker thread (:class:`~chameleon_sglang.catalog.background_reads.BackgroundReads`): it builds
   the whole host-side ``LoRAAdapter`` (config, safetensors read, SGLang's weight normalisation)
   and the loop goes on; the request gets no answer yet;
2. :func:`finish_adapter_loads` (after ``Scheduler.process_input_requests``, every pass) takes
   the finished reads (with tensor parallelism, those finished on every rank, agreed by one small
   all-reduce, so ranks install in the same pass) and runs SGLang's own load for each, which
   installs the prepared adapter (:func:`install_prepared_adapter`, around
   ``LoRAManager.load_lora_weights``) instead of reading; SGLang's checks and our refusals run as
   before, and the answer goes to the tokenizer manager as SGLang would have sent it.

A read that fails or runs past ``--chameleon-adapter-read-timeout`` fails that load only (the
answer names the reason). The tokenizer manager holds a request for an adapter until its load is
answered, so nothing is scheduled with a half-installed adapter. With ``--sleep-on-idle`` an idle
scheduler polls every few milliseconds while a read is pending (:func:`poll_while_reads_pending`).
``CHAMELEON_ADAPTER_READ_DELAY_S`` (seconds; tests and benchmarks) makes every adapter read of
the process that much slower, in the loop or on a worker, with or without ``--chameleon``: a slow
disk or object store.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from chameleon_sglang.catalog.background_reads import BackgroundReads, Outcome, ReadStatus
from chameleon_sglang.integration import capability
from chameleon_sglang.integration.metrics import MetricsPublisher, ReadMetrics
from chameleon_sglang.integration.state import state_of

logger = logging.getLogger(__name__)

READ_DELAY_ENV = "CHAMELEON_ADAPTER_READ_DELAY_S"

_prepared: Dict[str, Outcome] = {}
"""This process's finished reads, by LoRA id, while SGLang's load of each runs."""
_in_process: List[BackgroundReads] = []
"""Every scheduler's background reads in this process."""
PENDING_POLL_S = 0.002
"""How long an idle scheduler sleeps between looks at pending reads (``--sleep-on-idle``)."""


def background_reads_for(scheduler: Any) -> Optional[BackgroundReads]:
    """The scheduler's background reads, created on first use; None where loads stay in the
    loop (Chameleon off, ``--chameleon-adapter-read-workers 0``, or parallelism we rule out)."""
    state = state_of(scheduler)
    if state is None or not state.config.enabled or state.config.adapter_read_workers < 1:
        return None
    if capability.parallelism_unsupported_reason(scheduler.server_args) is not None:
        return None
    if state.reads is None:
        state.reads = BackgroundReads(
            state.config.adapter_read_workers, state.config.adapter_read_timeout_s
        )
        _in_process.append(state.reads)
        state.read_metrics = MetricsPublisher(scheduler, ReadMetrics)
    return state.reads


def defer_adapter_load(original: Callable, scheduler: Any, recv_req: Any, *args: Any, **kw: Any):
    """Around ``Scheduler.load_lora_adapter``: start the read on a worker and answer later
    (:func:`finish_adapter_loads`); SGLang's own load where reads stay in the loop."""
    reads = background_reads_for(scheduler)
    if reads is None:
        return original(scheduler, recv_req, *args, **kw)
    manager = scheduler.tp_worker.model_runner.lora_manager
    ref = recv_req.to_ref()
    reads.submit(ref.lora_id, lambda: build_host_adapter(manager, ref), (original, recv_req))
    logger.info("Reading LoRA adapter %s from %s in the background", ref.lora_name, ref.lora_path)
    return None


def finish_adapter_loads(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``Scheduler.process_input_requests``: install the reads finished on every rank
    and answer their load requests (module docstring)."""
    state = state_of(scheduler)
    reads = state.reads if state is not None else None
    if reads is None:
        return result
    state.read_metrics.maybe_publish(time.monotonic(), reads.stats)
    if reads.num_pending == 0:
        return result
    for outcome in reads.take(_agreed(reads.status())):
        original, recv_req = outcome.payload
        _prepared[outcome.key] = outcome
        try:
            output = original(scheduler, recv_req)
        finally:
            _prepared.pop(outcome.key, None)
        scheduler.send_control_output(output, recv_req)
    return result


def poll_while_reads_pending(original: Callable, sleeper: Any, *args: Any, **kwargs: Any):
    """Around ``IdleSleeper.maybe_sleep`` (``--sleep-on-idle``): while a read is pending, an
    idle scheduler looks again within milliseconds instead of sleeping up to a second on its
    sockets (a finished read wakes no socket)."""
    if any(reads.num_pending for reads in _in_process):
        time.sleep(PENDING_POLL_S)
        return None
    return original(sleeper, *args, **kwargs)


def install_prepared_adapter(original: Callable, manager: Any, lora_ref: Any, *a: Any, **k: Any):
    """Around ``LoRAManager.load_lora_weights``: the adapter a worker built for this load
    (or its error, raised here so SGLang reports it); SGLang's read where there is none, its
    weights then copied out of the file's memory map (:func:`own_weight_memory`)."""
    outcome = _prepared.get(lora_ref.lora_id)
    if outcome is None:
        _simulated_read_delay()
        result = original(manager, lora_ref, *a, **k)
        adapter = manager.loras.get(lora_ref.lora_id)
        if adapter is not None:
            own_weight_memory(adapter)
        return result
    if outcome.error is not None:
        raise outcome.error
    manager.loras[lora_ref.lora_id] = outcome.value
    return None


def build_host_adapter(manager: Any, lora_ref: Any) -> Any:
    """SGLang's host-side adapter for ``lora_ref``, as ``LoRAManager.load_lora_weights`` builds
    it (runs on a worker thread: reads only ``manager``'s immutable model facts)."""
    from sglang.srt.lora.lora import LoRAAdapter
    from sglang.srt.lora.lora_config import LoRAConfig

    _simulated_read_delay()
    config = LoRAConfig(lora_ref.lora_path, base_vocab_size=manager.base_hf_config.vocab_size)
    adapter = LoRAAdapter(
        lora_ref.lora_id,
        config,
        manager.base_hf_config,
        manager.load_config,
        manager.lora_backend,
        base_model=manager.base_model,
    )
    adapter.initialize_weights()
    own_weight_memory(adapter)
    return adapter


def own_weight_memory(adapter: Any) -> None:
    """Replace every weight tensor of SGLang's host-side ``LoRAAdapter`` that is not a copy
    already by one. SGLang reads adapter files through safetensors' memory map, and tensors it
    does not transform (``o_proj``, ``down_proj``, ...) stay views of the mapped file: when the
    file is then rewritten in place or truncated (an operator replacing an adapter), the next
    copy into device memory touches pages that no longer exist and the process dies of SIGBUS
    (found by the soak with faults). A copy also makes the host tier's bytes real memory."""
    for layer in adapter.layers:
        layer.weights = {name: w.clone() for name, w in layer.weights.items()}
    for table in ("embedding_layers", "added_tokens_embeddings"):
        weights = getattr(adapter, table, None)
        if weights:
            setattr(adapter, table, {name: w.clone() for name, w in weights.items()})


def _simulated_read_delay() -> None:
    delay = float(os.environ.get(READ_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _agreed(statuses: List[ReadStatus]) -> Sequence[ReadStatus]:
    """``statuses`` combined over the tensor-parallel ranks: done where done on every rank,
    succeeded where succeeded on every rank (every rank holds the same pending reads)."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    if parallel.tp_size == 1 or not statuses:
        return statuses
    import torch
    import torch.distributed as dist

    flags = torch.tensor([int(f) for status in statuses for f in status], dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=parallel.tp_group.cpu_group)
    values = flags.tolist()
    return [(bool(values[2 * i]), bool(values[2 * i + 1])) for i in range(len(statuses))]
