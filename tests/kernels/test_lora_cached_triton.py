"""The Triton LoRA kernels, under the Triton interpreter, in a process of their own.

Triton decides when it is first imported whether its ``@jit`` library functions run
interpreted; in this test process SGLang has imported it long before. The cases
(``triton_interpreter_cases.py``) therefore run in a fresh Python started with
``TRITON_INTERPRET=1``; their pytest output is shown when they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("triton_interpreter_cases.py")


def test_triton_kernels_match_the_float32_reference_under_the_interpreter():
    """Every interpreter case passes (shrink/expand vs a float32 reference, dispatch, table)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
