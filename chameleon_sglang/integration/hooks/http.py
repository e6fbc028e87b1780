"""The launcher process's HTTP server: ``GET /chameleon/stats``, and a quiet Ctrl-C."""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict

from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.integration.hooks.host_tier import catalog_stats

logger = logging.getLogger(__name__)

STATS_PATH = "/chameleon/stats"


def serve_http(original: Callable, server_args: Any, *args: Any, **kwargs: Any) -> Any:
    """SGLang's ``launch_server``, with ``GET /chameleon/stats`` added. With ``--chameleon``, a
    Ctrl-C (SIGINT) ends it with one log line instead of a ``KeyboardInterrupt`` traceback:
    SGLang has shut uvicorn down and stopped its own processes by then (its ``finally``)."""
    add_http_routes()
    try:
        return original(server_args, *args, **kwargs)
    except KeyboardInterrupt:
        if not getattr(server_args, "chameleon", False):
            raise
        logger.info("Interrupted: the server and its processes are stopped")
        return None


def add_http_routes() -> None:
    """Add ``GET /chameleon/stats`` to SGLang's app (once)."""
    from sglang.srt.entrypoints import http_server

    app = http_server.app
    if any(getattr(route, "path", None) == STATS_PATH for route in app.routes):
        return

    async def chameleon_stats() -> Dict[str, Any]:
        """Chameleon's live statistics per scheduler (data-parallel rank)."""
        manager = http_server._global_state.tokenizer_manager
        states = await manager.get_internal_state()
        config = ChameleonConfig.from_server_args(manager.server_args)
        ranks = [state.get("chameleon", {}) for state in states]
        return {
            "enabled": config.enabled,
            "host_tier": catalog_stats(manager),
            "ranks": sorted(ranks, key=dp_rank_of),
        }

    app.add_api_route(STATS_PATH, chameleon_stats, methods=["GET"])


def dp_rank_of(rank: Dict[str, Any]) -> int:
    """Sort key of one scheduler's statistics: its data-parallel rank where it reports one
    (replies arrive in any order), else 0 (the order SGLang gave is kept: the sort is stable)."""
    dp = rank.get("dp") if isinstance(rank, dict) else None
    return int(dp.get("dp_rank", 0)) if isinstance(dp, dict) else 0
