"""Chameleon's scheduler policy core (paper §4.3), free of SGLang and torch.

``ChameleonPolicy`` is the facade the engine integration uses; the pieces are importable on
their own for tests and experiments.
"""

from chameleon_sglang.scheduler.entry import AdmitResult, RequestEntry
from chameleon_sglang.scheduler.multi_level_queue import (
    BypassHooks,
    MultiLevelQueue,
    PassResult,
    TryAdmit,
)
from chameleon_sglang.scheduler.policy import ChameleonPolicy
from chameleon_sglang.scheduler.predictor import (
    MaxNewTokensPredictor,
    OnlinePredictor,
    OutputPredictor,
    create_predictor,
)
from chameleon_sglang.scheduler.queues import LayoutFit, QueueLayout, fit_layout, static_layout
from chameleon_sglang.scheduler.quotas import QueueDemand, QueueStats, QuotaPlan, plan_quotas
from chameleon_sglang.scheduler.wrs import SizeLimits, compute_wrs

__all__ = [
    "AdmitResult",
    "BypassHooks",
    "ChameleonPolicy",
    "LayoutFit",
    "MaxNewTokensPredictor",
    "MultiLevelQueue",
    "OnlinePredictor",
    "OutputPredictor",
    "PassResult",
    "QueueDemand",
    "QueueLayout",
    "QueueStats",
    "QuotaPlan",
    "RequestEntry",
    "SizeLimits",
    "TryAdmit",
    "compute_wrs",
    "create_predictor",
    "fit_layout",
    "plan_quotas",
    "static_layout",
]
