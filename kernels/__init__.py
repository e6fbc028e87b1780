"""chameleon-sglang kernels, importable as ``chameleon_kernels`` (torch, numba, Triton; no SGLang).

- ``lora_cached``: LoRA shrink/expand over adapters where the adapter cache keeps them (the CPU
  path; torch on any device), with ``lora_cached_numba`` (compiled decode loop) and
  ``lora_locations`` (the matrix location table its plans gather from);
- ``lora_table`` / ``lora_table_triton``: the GPU path: a device location table, per-batch
  segment buffers of fixed address and Triton kernels that read them (CUDA-graph safe), checked
  by ``graph_guard``;
- ``gpu_check``: the GPU path on a real GPU, one command (``make gpu-check``);
- ``sgl_kernel_cpu``: torch stand-ins for the ``sgl_kernel`` ops SGLang's CPU path calls.
"""
