"""Scale-out across data-parallel replicas: adapter-affinity dispatch (paper §4.4)."""

from chameleon_sglang.dp.affinity import AffinityDispatcher, ReplicaReport

__all__ = ["AffinityDispatcher", "ReplicaReport"]
