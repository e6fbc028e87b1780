"""``CHAMELEON_TABLE_PATH_ON_CPU``, the switch that serves a CPU server's LoRA through the GPU
path: honoured only where the Triton kernels run interpreted, else refused with a log line. (The
whole forward it enables is ``tests/e2e/test_gpu_path_on_cpu.py``.)"""

from __future__ import annotations

import logging

from chameleon_kernels import lora_table_triton
from chameleon_sglang.integration import lora_pool


def test_unset_means_the_cpu_path(monkeypatch):
    monkeypatch.delenv(lora_pool.TABLE_PATH_ON_CPU_ENV, raising=False)
    assert lora_pool.table_path_on_cpu() is False


def test_set_without_the_interpreter_is_refused_with_a_reason(monkeypatch, caplog):
    monkeypatch.setenv(lora_pool.TABLE_PATH_ON_CPU_ENV, "1")
    monkeypatch.setattr(lora_table_triton, "INTERPRETED", False)
    with caplog.at_level(logging.WARNING, logger=lora_pool.logger.name):
        assert lora_pool.table_path_on_cpu() is False
    assert "TRITON_INTERPRET=1" in caplog.text


def test_set_with_the_interpreter_is_honoured(monkeypatch):
    monkeypatch.setenv(lora_pool.TABLE_PATH_ON_CPU_ENV, "1")
    monkeypatch.setattr(lora_table_triton, "INTERPRETED", True)
    assert lora_pool.table_path_on_cpu() is True
