"""Read an LLM inference trace: CSV ``TIMESTAMP,ContextTokens,GeneratedTokens[,AdapterId]``.

Contract: ``read_trace(path)`` returns one :class:`TraceRow` per data row, in file order, with
``offset_s`` relative to the earliest row returned. ``TIMESTAMP`` is either a number of seconds or
an ISO date-time (any number of fractional digits, e.g. ``2023-11-16 18:15:46.6805900``).
``AdapterId`` is optional; when absent every row has ``adapter_id=None``.
"""

from __future__ import annotations

import csv
import dataclasses
from datetime import datetime
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
TRACES = REPO_ROOT / "eval" / "traces" / "azure_llm_2023"
DEFAULT_TRACE = TRACES / "AzureLLMInferenceTrace_conv.csv"
"""The Azure LLM inference trace 2023 (conversation), kept in the repository (CC-BY-4.0)."""
CODE_TRACE = TRACES / "AzureLLMInferenceTrace_code.csv"

REQUIRED_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
ADAPTER_COLUMN = "AdapterId"


@dataclasses.dataclass(frozen=True)
class TraceRow:
    """One trace request: arrival offset (s), prompt and output length (tokens), adapter id."""

    offset_s: float
    input_tokens: int
    output_tokens: int
    adapter_id: Optional[str] = None


def parse_timestamp(value: str) -> float:
    """Seconds as a float: a plain number, or an ISO date-time as POSIX seconds."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    if "." in text:
        head, frac = text.rsplit(".", 1)
        if frac.isdigit() and len(frac) > 6:
            text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text).timestamp()


def has_adapter_column(path: Path) -> bool:
    """Whether the trace at ``path`` carries an ``AdapterId`` column."""
    with open(path, newline="") as f:
        return ADAPTER_COLUMN in (csv.DictReader(f).fieldnames or [])


def read_trace(path: Path, start_row: int = 0, max_rows: Optional[int] = None) -> List[TraceRow]:
    """Rows ``start_row .. start_row+max_rows`` of the trace at ``path``."""
    rows: List[TraceRow] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; need {list(REQUIRED_COLUMNS)}")
        has_adapter = ADAPTER_COLUMN in (reader.fieldnames or [])
        for i, rec in enumerate(reader):
            if i < start_row:
                continue
            if max_rows is not None and len(rows) >= max_rows:
                break
            adapter = rec[ADAPTER_COLUMN].strip() if has_adapter else None
            rows.append(TraceRow(
                offset_s=parse_timestamp(rec["TIMESTAMP"]),
                input_tokens=int(float(rec["ContextTokens"])),
                output_tokens=int(float(rec["GeneratedTokens"])),
                adapter_id=adapter or None,
            ))
    if not rows:
        raise ValueError(f"{path}: no data rows from row {start_row}")
    first = min(r.offset_s for r in rows)
    return [dataclasses.replace(r, offset_s=r.offset_s - first) for r in rows]
