"""Read an LLM inference trace: CSV ``TIMESTAMP,ContextTokens,GeneratedTokens[,AdapterId]``, or
JSONL with ``timestamp``, ``input_length``, ``output_length`` (the Mooncake/Kimi trace format).

Contract: ``read_trace(path)`` returns one :class:`TraceRow` per data row, in file order, with
``offset_s`` relative to the earliest row returned. CSV: ``TIMESTAMP`` is either a number of
seconds or an ISO date-time (any number of fractional digits, e.g. ``2023-11-16
18:15:46.6805900``); ``AdapterId`` is optional; when absent every row has ``adapter_id=None``.
A path ending in ``.jsonl`` is read as JSONL (:func:`read_jsonl_rows`: timestamps in
milliseconds, as Mooncake's, optional ``adapter`` key); ``python -m eval.trace IN.jsonl OUT.csv``
converts one to the CSV shape.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
TRACES = REPO_ROOT / "eval" / "traces" / "azure_llm_2023"
DEFAULT_TRACE = TRACES / "AzureLLMInferenceTrace_conv.csv"
"""The Azure LLM inference trace 2023 (conversation), kept in the repository (CC-BY-4.0)."""
CODE_TRACE = TRACES / "AzureLLMInferenceTrace_code.csv"

REQUIRED_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
ADAPTER_COLUMN = "AdapterId"
JSONL_KEYS = ("timestamp", "input_length", "output_length")
JSONL_ADAPTER_KEYS = ("adapter", "adapter_id", "lora", "AdapterId")
TIME_UNITS = {"ms": 1e-3, "s": 1.0}


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


def is_jsonl(path: Path) -> bool:
    return Path(path).suffix == ".jsonl"


def has_adapter_column(path: Path) -> bool:
    """Whether the trace at ``path`` carries an ``AdapterId`` column (JSONL: an adapter key in
    its first row)."""
    if is_jsonl(path):
        first = next(read_jsonl_rows(path), None)
        return first is not None and first.adapter_id is not None
    with open(path, newline="") as f:
        return ADAPTER_COLUMN in (csv.DictReader(f).fieldnames or [])


def read_jsonl_rows(path: Path, time_unit: str = "ms") -> Iterator[TraceRow]:
    """The rows of a JSONL trace, absolute times in seconds (``time_unit``: of its
    ``timestamp``). Raises ``ValueError`` naming the line of a row without the required keys."""
    scale = TIME_UNITS[time_unit]
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                values = [rec[k] for k in JSONL_KEYS]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{number}: not a trace row with {list(JSONL_KEYS)} "
                    f"({type(exc).__name__}: {exc})"
                ) from None
            adapter = next(
                (rec[k] for k in JSONL_ADAPTER_KEYS if rec.get(k) not in (None, "")), None
            )
            yield TraceRow(
                float(values[0]) * scale,
                int(values[1]),
                int(values[2]),
                None if adapter is None else str(adapter),
            )


def read_trace(path: Path, start_row: int = 0, max_rows: Optional[int] = None) -> List[TraceRow]:
    """Rows ``start_row .. start_row+max_rows`` of the trace at ``path``."""
    if is_jsonl(path):
        rows = [r for i, r in enumerate(read_jsonl_rows(path)) if i >= start_row]
        rows = rows[:max_rows] if max_rows is not None else rows
        return _relative(rows, path, start_row)
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
            rows.append(
                TraceRow(
                    offset_s=parse_timestamp(rec["TIMESTAMP"]),
                    input_tokens=int(float(rec["ContextTokens"])),
                    output_tokens=int(float(rec["GeneratedTokens"])),
                    adapter_id=adapter or None,
                )
            )
    return _relative(rows, path, start_row)


def _relative(rows: List[TraceRow], path: Path, start_row: int) -> List[TraceRow]:
    if not rows:
        raise ValueError(f"{path}: no data rows from row {start_row}")
    first = min(r.offset_s for r in rows)
    return [dataclasses.replace(r, offset_s=r.offset_s - first) for r in rows]


def write_csv(rows: Sequence[TraceRow], path: Path) -> None:
    """``rows`` as a CSV trace (seconds from the first row; ``AdapterId`` when any row has one)."""
    with_adapter = any(r.adapter_id is not None for r in rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(REQUIRED_COLUMNS) + ([ADAPTER_COLUMN] if with_adapter else []))
        for r in rows:
            writer.writerow(
                [f"{r.offset_s:.6f}", r.input_tokens, r.output_tokens]
                + ([r.adapter_id or ""] if with_adapter else [])
            )


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.trace",
        description="Convert a JSONL trace (timestamp, input_length, "
        "output_length[, adapter]) to the CSV trace shape.",
    )
    p.add_argument("jsonl", type=Path)
    p.add_argument("csv", type=Path)
    p.add_argument(
        "--time-unit",
        choices=sorted(TIME_UNITS),
        default="ms",
        help="unit of the JSONL timestamps (Mooncake: ms)",
    )
    args = p.parse_args(argv)
    rows = _relative(list(read_jsonl_rows(args.jsonl, args.time_unit)), args.jsonl, 0)
    write_csv(rows, args.csv)
    print(f"{len(rows)} rows over {max(r.offset_s for r in rows):.1f} s -> {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
