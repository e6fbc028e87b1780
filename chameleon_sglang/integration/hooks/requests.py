"""Checks of incoming requests that SGLang 0.5.23 does not make, installed in every server.

- :func:`refuse_unservable_prompts`: a prompt given as ``input_ids`` with an id outside
  ``[0, vocab_size)`` is refused with a ``ValueError`` before tokenisation ends, which SGLang's
  HTTP layer answers with 400 and the message. Stock SGLang passes such ids to the embedding: on
  a CPU it serves garbage with 200, on a GPU the out-of-range index is a device-side assert that
  kills the server. An empty prompt (an empty ``input_ids`` in a batch, which SGLang's own
  check misses) is refused too: stock SGLang schedules it and its scheduler dies on an
  assertion when the prefill's KV is released (found by API fuzzing). So is a
  ``top_logprobs_num`` above the vocabulary size: the scheduler's ``topk`` fails and stops the
  server (fuzzing again; SGLang checks ``token_ids_logprob`` itself). And so is a single
  prompt whose ``lora_path`` is not one name (a list, say): the scheduler's request
  constructor fails on it and the server stops (fuzzing). Installed with
  and without ``--chameleon`` (a fix for invalid input only; valid requests are untouched).
- :func:`refuse_sampling_values_sglang_overflows`: a ``top_k`` above 2**31 - 1 passes SGLang's
  own check, then overflows the int32 tensor the scheduler builds for the batch; that
  ``RuntimeError`` stops the scheduler and the whole server (found by API fuzzing, stock and
  ``--chameleon`` alike). Refused with a ``ValueError`` (HTTP 400) where SGLang verifies the
  sampling parameters. Installed with and without ``--chameleon``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence


def out_of_vocab_message(input_ids: Optional[Sequence[int]], vocab_size: int) -> Optional[str]:
    """Why ``input_ids`` cannot be served by a model of ``vocab_size`` tokens (None: it can)."""
    if not input_ids or vocab_size <= 0:
        return None
    lo, hi = min(input_ids), max(input_ids)
    if lo >= 0 and hi < vocab_size:
        return None
    bad = lo if lo < 0 else hi
    return f"input_ids holds token id {bad}, outside the model's vocabulary [0, {vocab_size})"


INT32_MAX = 2**31 - 1


def sampling_overflow_message(top_k: Any) -> Optional[str]:
    """Why ``top_k`` would overflow the scheduler's int32 batch tensor (None: it would not)."""
    if isinstance(top_k, int) and top_k > INT32_MAX:
        return f"top_k must be -1 (the whole vocabulary) or in [1, {INT32_MAX}], got {top_k}."
    return None


def refuse_sampling_values_sglang_overflows(params: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook of ``SamplingParams.verify`` (module docstring)."""
    message = sampling_overflow_message(getattr(params, "top_k", None))
    if message is not None:
        raise ValueError(message)


def logprob_request_message(top_logprobs_num: Any, vocab_size: int) -> Optional[str]:
    """Why ``top_logprobs_num`` log-probabilities cannot be computed for a vocabulary of
    ``vocab_size`` (None: they can)."""
    if vocab_size > 0 and isinstance(top_logprobs_num, int) and top_logprobs_num > vocab_size:
        return (
            f"top_logprobs_num must be at most the vocabulary size {vocab_size}, "
            f"got {top_logprobs_num}"
        )
    return None


EMPTY_PROMPT_MESSAGE = "the prompt is empty: input_ids (or the tokenized text) needs a token"


def refuse_unservable_prompts(
    manager: Any, obj: Any, input_ids: Any, *args: Any, **kwargs: Any
) -> None:
    """BEFORE hook of ``TokenizerManager._validate_one_request``, called for every prompt of a
    batch too (module docstring)."""
    if isinstance(input_ids, list) and not input_ids and getattr(obj, "input_embeds", None) is None:
        raise ValueError(EMPTY_PROMPT_MESSAGE)
    lora_path = getattr(obj, "lora_path", None)
    if lora_path is not None and not isinstance(lora_path, str):
        raise ValueError(
            f"lora_path of one prompt must be one adapter name, got {type(lora_path).__name__} "
            f"{lora_path!r:.80} (a list only for a batch: one name per prompt)"
        )
    vocab_size = int(getattr(getattr(manager, "model_config", None), "vocab_size", 0) or 0)
    message = logprob_request_message(getattr(obj, "top_logprobs_num", None), vocab_size)
    if message is not None:
        raise ValueError(message)
    if isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], int):
        message = out_of_vocab_message(input_ids, vocab_size)
        if message is not None:
            raise ValueError(message)
