"""chameleon-sglang kernels, importable as ``chameleon_kernels``.

- ``sgl_kernel_cpu``: torch stand-ins for the ``sgl_kernel`` ops SGLang's CPU path calls.
"""
