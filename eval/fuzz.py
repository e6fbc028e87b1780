"""API fuzzing, stock SGLang and ``--chameleon`` side by side: the same generated requests, in
the same order, to both servers.

``python -m eval.fuzz [--preset tiny] [--schema-examples 60] [--near-valid 1000] [--seed 0]
[--out DIR]``

Both servers run with ``--api-key`` and ``--admin-api-key`` (requests carry the key their route
takes); the chameleon server also has the preset's adapter directory (``--chameleon-adapter-dir``),
so hostile adapter names reach the catalog's resolver. Requests come from
:mod:`eval.fuzz_cases`: schemathesis over the server's own OpenAPI document (valid and, where it
is fast, invalid bodies) and near-valid requests with hostile values.

Passes when: both servers stay alive; every failure of the chameleon server (a 5xx, a timeout,
a dropped connection or broken stream) is a failure of stock for the same request (stock's
failures are SGLang's own: counted and listed); afterwards the chameleon server's invariant
checker is clean, its quota usage and adapter references are zero, and a probe request's
greedy output is unchanged on both. Writes ``fuzz.json``; exit status 0 only on a pass.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import requests

from chameleon_sglang.dev.assets import Assets, build
from chameleon_sglang.dev.serve import ServerProcess, free_port, served_model_name, server_command
from chameleon_sglang.integration import integrity
from eval.fuzz_cases import FuzzRequest, near_valid_requests, schema_requests
from eval.soak import probe, settle

USER_KEY = "fuzz-user-key"
ADMIN_KEY = "fuzz-admin-key"
AUTH_ARGS = ("--api-key", USER_KEY, "--admin-api-key", ADMIN_KEY)
REQUEST_TIMEOUT_S = 120.0


@dataclasses.dataclass
class Target:
    """One server under test: its URL, whether it runs Chameleon, and a liveness check."""

    name: str
    url: str
    chameleon: bool
    alive: Callable[[], bool]


def auth_headers(admin: bool) -> Dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY if admin else USER_KEY}"}


def outcome_of(url: str, request: FuzzRequest, timeout_s: float = REQUEST_TIMEOUT_S) -> str:
    """The HTTP status as a string, or ``timeout`` / ``connection`` when none came back; a
    streamed body is read to its end."""
    headers = auth_headers(request.admin)
    if request.content_type:
        headers["Content-Type"] = request.content_type
    try:
        with requests.request(
            request.method,
            url + request.path,
            params=request.query or None,
            json=request.json_body if request.raw_body is None else None,
            data=request.raw_body,
            headers=headers,
            timeout=timeout_s,
            stream=True,
        ) as resp:
            for _ in resp.iter_content(chunk_size=65536):
                pass
            return str(resp.status_code)
    except requests.Timeout:
        return "timeout"
    except requests.RequestException as exc:
        return f"connection: {type(exc).__name__}"


def is_failure(outcome: str) -> bool:
    """A 5xx, or no answer at all (a hang, a dropped connection or a broken stream)."""
    return not outcome.isdigit() or outcome.startswith("5")


def fuzz(
    targets: Sequence[Target], cases: Sequence[FuzzRequest], protected_adapters: Sequence[str] = ()
) -> Dict[str, Any]:
    """Send every case to every target in turn; the per-case outcomes and per-arm counts.
    Cases that would unload a ``protected_adapters`` name (the probe's) are skipped."""
    rows: List[Dict[str, Any]] = []
    skipped = 0
    for case in cases:
        if case.path == "/unload_lora_adapter" and set(case.adapter_names()) & set(
            protected_adapters
        ):
            skipped += 1
            continue
        row = {"case": case.repro(), "source": case.source, "operation": case.operation}
        for target in targets:
            row[target.name] = outcome_of(target.url, case)
        rows.append(row)
    counts = {t.name: collections.Counter(_status_class(r[t.name]) for r in rows) for t in targets}
    return {"rows": rows, "counts": counts, "skipped_protected": skipped}


def _status_class(outcome: str) -> str:
    return outcome[0] + "xx" if outcome.isdigit() else outcome.split(":")[0]


def verdict(result: Dict[str, Any], stock: str, chameleon: str) -> Dict[str, Any]:
    """The pass criterion over the outcomes: chameleon fails (5xx or no answer) only where stock
    fails too; stock's failures are SGLang's own and listed (the servers' state afterwards:
    :func:`after_checks`)."""
    rows = result["rows"]
    ours_only = [r for r in rows if is_failure(r[chameleon]) and not is_failure(r[stock])]
    differ = [r for r in rows if _status_class(r[stock]) != _status_class(r[chameleon])]
    return {
        "num_chameleon_only_failures": len(ours_only),
        "chameleon_only_failures": ours_only[:50],
        "num_sglang_failures": sum(is_failure(r[stock]) for r in rows),
        "sglang_failures": [r for r in rows if is_failure(r[stock])][:50],
        "num_status_class_differs": len(differ),
        "status_class_differs": differ[:50],
    }


def after_checks(target: Target, probe_adapter: str, before: List[int]) -> Dict[str, bool]:
    """The server is alive and its probe output unchanged; for Chameleon also its invariants,
    quota usage and adapter references."""
    checks = {"alive": target.alive()}
    if not checks["alive"]:
        return checks
    checks["probe_unchanged"] = _probe(target.url, probe_adapter) == before
    if target.chameleon:
        rank = _settled(target.url)
        sched, cache = rank.get("scheduler") or {}, rank.get("adapter_cache") or {}
        checks["integrity_clean"] = rank.get("integrity", ["not reported"]) == []
        checks["quota_usage_zero"] = not any(sched.get("usage", [1]))
        checks["references_zero"] = (
            cache.get("num_in_use", 1) == 0 and cache.get("num_holding_requests", 1) == 0
        )
    return checks


def _probe(url: str, adapter: str) -> List[int]:
    return probe(url, adapter, headers=auth_headers(False))


def _settled(url: str) -> Dict[str, Any]:
    return settle(url, timeout_s=60, headers=auth_headers(False))


def build_cases(
    openapi: Dict[str, Any], assets: Assets, schema_examples: int, near_valid: int, seed: int
) -> List[FuzzRequest]:
    """Schema cases first, then near-valid ones (they end with real generations)."""
    names = [a.name for a in assets.adapters]
    return schema_requests(openapi, schema_examples, seed) + near_valid_requests(
        near_valid, seed, names, served_model_name(assets), assets.recipe.vocab_size
    )


def openapi_of(url: str) -> Dict[str, Any]:
    resp = requests.get(url + "/openapi.json", headers=auth_headers(False), timeout=60)
    resp.raise_for_status()
    return resp.json()


def run(
    stock: Target,
    chameleon: Target,
    assets: Assets,
    schema_examples: int,
    near_valid: int,
    seed: int,
) -> Dict[str, Any]:
    """The whole fuzz over two running servers: cases, outcomes, verdict and checks."""
    probe_adapter = assets.adapters[0].name
    before = {t.name: _probe(t.url, probe_adapter) for t in (stock, chameleon)}
    started = time.monotonic()
    cases = build_cases(openapi_of(chameleon.url), assets, schema_examples, near_valid, seed)
    generated_s = time.monotonic() - started
    result = fuzz((stock, chameleon), cases, protected_adapters=[probe_adapter])
    report: Dict[str, Any] = {
        "num_cases": len(result["rows"]),
        "generation_s": round(generated_s, 1),
        "sending_s": round(time.monotonic() - started - generated_s, 1),
        "counts": {k: dict(v) for k, v in result["counts"].items()},
        "skipped_protected": result["skipped_protected"],
    }
    report.update(verdict(result, stock.name, chameleon.name))
    report["checks"] = {
        t.name: after_checks(t, probe_adapter, before[t.name]) for t in (stock, chameleon)
    }
    report["passed"] = report["num_chameleon_only_failures"] == 0 and all(
        all(c.values()) for c in report["checks"].values()
    )
    return report


def launch_args(arm: str, adapter_dir: Path) -> List[str]:
    """Extra launch arguments of an arm: both take the keys; chameleon also serves
    ``adapter_dir`` (the arms are otherwise identical)."""
    if arm == "stock":
        return list(AUTH_ARGS)
    return [*AUTH_ARGS, "--chameleon-adapter-dir", str(adapter_dir)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--schema-examples", type=int, default=60, help="per operation and mode")
    parser.add_argument("--near-valid", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    out_dir = args.out or Path("eval/results") / time.strftime("fuzz-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    assets = build(args.preset)
    os.environ[integrity.ENV_FLAG] = "1"
    adapter_dir = Path(assets.adapters[0].path).parent
    servers = {}
    for arm in ("stock", "chameleon"):
        port = free_port()
        extra = launch_args(arm, adapter_dir)
        cmd = server_command(
            assets, port, chameleon=arm == "chameleon", dtype=args.dtype, extra_args=extra
        )
        servers[arm] = ServerProcess(cmd, port, log_path=out_dir / f"{arm}.log").launch()
    try:
        for server in servers.values():
            server.wait_healthy(240.0)
        targets = {
            arm: Target(arm, s.url, arm == "chameleon", lambda s=s: s.proc.poll() is None)
            for arm, s in servers.items()
        }
        report = run(
            targets["stock"],
            targets["chameleon"],
            assets,
            args.schema_examples,
            args.near_valid,
            args.seed,
        )
    finally:
        for server in servers.values():
            server.stop()
    report.update(preset=args.preset, dtype=args.dtype, args=vars(args) | {"out": str(out_dir)})
    (out_dir / "fuzz.json").write_text(json.dumps(report, indent=1, default=str))
    keys = ("num_cases", "counts", "num_chameleon_only_failures", "num_sglang_failures", "checks")
    summary = {k: report[k] for k in keys}
    print(json.dumps(summary, indent=1))
    print(("PASSED" if report["passed"] else "FAILED") + f" -> {out_dir / 'fuzz.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
