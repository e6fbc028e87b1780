"""Pure-torch stand-ins for the ``sgl_kernel`` CPU ops that SGLang's CPU path calls.

SGLang's CPU kernels ship only in its source tree (PyPI has CUDA wheels of ``sgl-kernel`` and no
sdist). The patch set imports these functions only where ``import sgl_kernel`` fails, so a real
``sgl_kernel`` always wins where it is installed.

Implemented (called while serving): :func:`assign_req_to_token_pool_cpu`,
:func:`copy_all_layer_kv_cache_cpu`. Speculative-decoding helpers are imported by SGLang at start
but only called with speculative decoding, which this CPU path does not support: they raise a
clear ``NotImplementedError``.
"""

from __future__ import annotations

import ctypes
from typing import Any, NoReturn

import torch

__all__ = [
    "assign_req_to_token_pool_cpu",
    "copy_all_layer_kv_cache_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "reconstruct_indices_from_tree_mask",
]


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's new KV slots into its row of ``req_to_token``.

    Same contract as SGLang's Triton kernel ``assign_req_to_token_pool``: request ``i`` owns
    ``out_cache_loc[sum(len[:i]) : sum(len[:i+1])]`` with ``len = end - start``, stored at
    ``req_to_token[req_pool_indices[i], start[i]:end[i]]``.
    """
    del pool_len  # the row length is req_to_token.shape[1]
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """Copy KV rows ``src_loc`` to ``tgt_loc`` in every buffer.

    ``data_ptrs[i]`` is the address of buffer ``i`` and ``strides[i]`` its row size in bytes (the
    slot stride and the copy width, as in SGLang's tiled Triton copy). All sources are read before
    any target is written.
    """
    if tgt_loc.numel() == 0:
        return
    tgt = tgt_loc.to(torch.int64)
    src = src_loc.to(torch.int64)
    num_rows = int(torch.maximum(tgt.max(), src.max()).item()) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (num_rows * stride)).from_address(ptr)
        rows = torch.frombuffer(raw, dtype=torch.uint8).view(num_rows, stride)
        rows[tgt] = rows[src]


def _speculative_only(name: str):
    def unsupported(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: speculative decoding on a CPU needs SGLang's "
            "CPU kernels (sgl_kernel built from source)"
        )

    unsupported.__name__ = name
    return unsupported


assign_draft_cache_locs_contiguous_cpu = _speculative_only("assign_draft_cache_locs_contiguous_cpu")
assign_extend_cache_locs_cpu = _speculative_only("assign_extend_cache_locs_cpu")
fill_accept_out_cache_loc_cpu = _speculative_only("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _speculative_only("fill_bonus_tokens_cpu")
rotate_input_ids_cpu = _speculative_only("rotate_input_ids_cpu")
build_tree_kernel_efficient_cpu = _speculative_only("build_tree_kernel_efficient_cpu")
verify_tree_greedy_cpu = _speculative_only("verify_tree_greedy_cpu")
reconstruct_indices_from_tree_mask = _speculative_only("reconstruct_indices_from_tree_mask")
