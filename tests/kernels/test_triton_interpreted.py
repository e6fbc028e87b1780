"""The Triton LoRA kernels, under the Triton interpreter, in a process of their own.

Triton decides when it is first imported whether its ``@jit`` library functions run
interpreted; in this test process SGLang has imported it long before. The cases therefore run
in a fresh Python started with ``TRITON_INTERPRET=1``; their pytest output is shown when they
fail: ``triton_table_cases.py`` (kernels over the device location table, the GPU serving path),
``graph_discipline_cases.py`` (the GPU serving path's forward under a host-sync guard) and
``sglang_oracle_cases.py`` (ours against SGLang's own LoRA kernels and torch backend).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = ["triton_table_cases.py", "graph_discipline_cases.py", "sglang_oracle_cases.py"]
pytestmark = pytest.mark.slow  # a fresh interpreter each, and Triton interpreted: minutes


@pytest.mark.parametrize("cases", CASES)
def test_triton_kernels_match_the_float32_reference_under_the_interpreter(cases: str):
    """Every case of the module passes under the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(Path(__file__).with_name(cases)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
