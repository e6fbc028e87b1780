"""Adapter-affinity dispatch across data-parallel replicas, with bounded loads (pure policy).

Each replica runs its own Chameleon scheduler and adapter cache; sending a request to a replica
that does not hold its adapter costs a load there and, across N replicas, every replica ends up
loading every adapter. :class:`AffinityDispatcher` picks, per request, the replica of least
expected work, where work is load and a miss is priced as load:

1. ``cost(r) = load(r) + miss`` when ``r`` does not hold the request's adapter (resident, loading
   or queued there, from its last report), ``load(r)`` when it does; ``miss`` is ``miss_cost``
   (4 by default) times the mean request (an exponential mean of the tokens dispatched). A load
   itself costs about one prefill (a rank-64 7B adapter over PCIe); the price is higher because
   a miss also costs capacity: the copy evicts another adapter there, which misses later, and an
   adapter on two replicas takes cache room twice. More makes adapters stickier at the price of
   waiting behind a busier holder (1, 4 and 16 measured in the README), or
   ``epsilon`` times the mean replica load where that is more (with many requests in flight, one
   more ahead changes little). So a holder wins unless it is that much busier than another
   replica: at low load a request does not wait behind a busy holder while a replica that would
   only have to load the adapter idles, at high load adapters stay where they are;
2. ties go to holders, then to the adapter's own rendezvous-hash order (highest random weight,
   Thaler & Ravishankar): a cold adapter on idle replicas always goes to the same replica, so a
   rare adapter lives on one replica; a popular one overflows to more as its holders get busy,
   so it comes to live on several. A request on the base model goes to the least loaded replica;
3. a hard bound, as consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam): a
   replica takes a request only while its load is at most ``(1 + epsilon)`` times the mean load
   (this request included) plus ``slack`` mean requests, so no replica ends above that bound by
   more than one request. The slack plays the part of that paper's ceiling (its capacities are
   whole items): with a request or two in flight per replica, ``(1 + epsilon)`` times the mean
   alone is less than one request of room, and would send a request away from its adapter
   whenever its holder had one more in flight (measured: most of the misses at moderate load).
   The least loaded replica is never above the mean, so a request is never refused and no
   replica starves.

Load is the work left on the replica as last reported (a request waiting for its prefill counts
prompt plus output cap, one decoding the output its cap leaves), plus every request dispatched to
it that the replica had not yet received when it made that report (each counts its prompt plus
its output cap). Reports carry the number of requests the replica has received; dispatches are
acknowledged in order by that count, so a request in flight (sent while the replica is busy in a
forward pass and not yet read from its socket) is never forgotten by a report made before it
arrived. A report without a count acknowledges everything dispatched so far.
A replica that leaves is dropped from every order. Deterministic: no clock, no randomness beyond
fixed hashes. Cost per request: one pass over the replicas (about 20 us at 64 in CPython).
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from typing import Deque, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple


@dataclasses.dataclass(frozen=True)
class ReplicaReport:
    """What a replica says of itself: adapters it holds (resident or loading) and its load."""

    replica: int
    adapters: FrozenSet[str]
    load_tokens: int
    received: Optional[int] = None
    """Requests the replica had received from the dispatcher when it made this report (None: all
    that were sent)."""


_MASK = (1 << 64) - 1
MEAN_WEIGHT = 0.05  # of the newest request in the mean request size (about the last 20)


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``x``."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


def _order_of(key: str, replicas: Sequence[int]) -> List[int]:
    """Replicas by rendezvous weight for ``key``, highest first (ties: lower index)."""
    base = zlib.crc32(key.encode()) << 32
    return sorted(replicas, key=lambda r: (-_mix(base ^ _mix(r + 1)), r))


class AffinityDispatcher:
    """Dispatch requests to replicas by adapter residency within a load bound (module docs)."""

    def __init__(
        self,
        replicas: Iterable[int],
        epsilon: float = 0.25,
        miss_cost: float = 4.0,
        slack: float = 1.0,
    ) -> None:
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if miss_cost < 0:
            raise ValueError(f"miss_cost must be >= 0, got {miss_cost}")
        if slack < 0:
            raise ValueError(f"slack must be >= 0, got {slack}")
        self.epsilon = float(epsilon)
        self.miss_cost = float(miss_cost)
        self.slack = float(slack)
        self._mean_tokens: Optional[float] = None
        self._replicas: List[int] = sorted(set(replicas))
        if not self._replicas:
            raise ValueError("no replicas")
        self._reported: Dict[int, int] = {}
        self._in_flight: Dict[int, Deque[int]] = {}  # tokens of requests not yet received
        self._pending: Dict[int, int] = {}  # their sum
        self._sent: Dict[int, int] = {}  # requests dispatched to the replica, ever
        for r in self._replicas:
            self._reset_replica(r)
        self._holders: Dict[str, Set[int]] = {}
        self._held: Dict[int, FrozenSet[str]] = {r: frozenset() for r in self._replicas}
        self._orders: Dict[str, List[int]] = {}
        self._total = 0
        self.num_affinity = 0
        self.num_missed = 0

    @property
    def replicas(self) -> List[int]:
        return list(self._replicas)

    def _reset_replica(self, replica: int) -> None:
        self._reported[replica] = 0
        self._in_flight[replica] = collections.deque()
        self._pending[replica] = 0
        self._sent[replica] = 0

    def load(self, replica: int) -> int:
        return self._reported[replica] + self._pending[replica]

    def in_flight(self, replica: int) -> int:
        """Requests dispatched to ``replica`` that its latest report had not yet received."""
        return len(self._in_flight[replica])

    def report(self, report: ReplicaReport) -> None:
        """A replica's latest state replaces what was known of it; the requests it had received
        leave the in-flight count (module docs)."""
        r = report.replica
        if r not in self._reported:
            return
        before = self.load(r)
        queue = self._in_flight[r]
        if report.received is None or report.received >= self._sent[r]:
            queue.clear()
            self._pending[r] = 0
        else:
            unreceived = max(self._sent[r] - int(report.received), 0)
            while len(queue) > unreceived:
                self._pending[r] -= queue.popleft()
        self._reported[r] = int(report.load_tokens)
        self._total += self.load(r) - before
        if report.adapters != self._held[r]:
            for adapter in self._held[r] - report.adapters:
                self._holders[adapter].discard(r)
            for adapter in report.adapters - self._held[r]:
                self._holders.setdefault(adapter, set()).add(r)
            self._held[r] = frozenset(report.adapters)

    def add_replica(self, replica: int) -> None:
        """A replica (re)joined, holding nothing and idle until it reports."""
        if replica in self._reported:
            return
        self._replicas = sorted(self._replicas + [replica])
        self._reset_replica(replica)
        self._held[replica] = frozenset()
        self._orders.clear()

    def remove_replica(self, replica: int) -> None:
        """The replica left: no request goes there any more."""
        if replica not in self._reported or len(self._replicas) == 1:
            raise ValueError(f"cannot remove replica {replica} (unknown, or the last one)")
        self._total -= self.load(replica)
        self._replicas.remove(replica)
        for adapter in self._held.pop(replica):
            self._holders[adapter].discard(replica)
        del self._reported[replica], self._in_flight[replica], self._pending[replica]
        del self._sent[replica]
        self._orders.clear()

    def dispatch(self, adapter: Optional[str], tokens: int) -> int:
        """The replica for a request of ``tokens`` (prompt + output cap) on ``adapter`` (None:
        the base model), counted in that replica's load until a report says it arrived."""
        mean = self._mean_tokens
        self._mean_tokens = float(tokens) if mean is None else mean + MEAN_WEIGHT * (tokens - mean)
        bound = self.bound(tokens)
        if adapter is None:  # the base model: every replica holds it
            choice, held = min(self._replicas, key=lambda r: (self.load(r), r)), True
        else:
            choice, held = self._cheapest(adapter, bound)
        if held:
            self.num_affinity += 1
        else:
            self.num_missed += 1
        self.count_routed(choice, tokens)
        return choice

    def bound(self, tokens: int) -> float:
        """The most load a replica may have and still take a request of ``tokens``: ``(1 +
        epsilon)`` times the mean load with the request, plus ``slack`` mean requests."""
        mean_load = (self._total + tokens) / len(self._replicas)
        return (1.0 + self.epsilon) * mean_load + self.slack * (self._mean_tokens or 0.0)

    def count_routed(self, replica: int, tokens: int) -> None:
        """A request sent to ``replica`` by another rule (``routed_dp_rank``): counted in its
        load, and in what it must acknowledge, as a dispatch is."""
        if replica not in self._reported:
            return
        self._in_flight[replica].append(tokens)
        self._pending[replica] += tokens
        self._sent[replica] += 1
        self._total += tokens

    def miss_tokens(self) -> float:
        """What a miss counts as, in tokens of load: ``miss_cost`` mean requests, or ``epsilon``
        times the mean replica load where that is more."""
        mean_load = self._total / len(self._replicas)
        return max(self.miss_cost * (self._mean_tokens or 0.0), self.epsilon * mean_load)

    def _cheapest(self, adapter: str, bound: float) -> Tuple[int, bool]:
        """(replica, holds the adapter) of least cost within the bound (module docs, 1-3)."""
        holders = self._holders.get(adapter) or ()
        miss = self.miss_tokens()
        best: Optional[Tuple[float, int, int]] = None
        choice, held = -1, False
        reported, pending = self._reported, self._pending
        for rank, r in enumerate(self._order(adapter)):
            load = reported[r] + pending[r]
            if load > bound:
                continue
            hold = r in holders
            key = (load if hold else load + miss, 0 if hold else 1, rank)
            if best is None or key < best:
                best, choice, held = key, r, hold
        if best is None:  # cannot happen (the least loaded is within the bound); kept for safety
            choice = min(self._replicas, key=lambda r: (self.load(r), r))
            held = choice in holders
        return choice, held

    def _order(self, adapter: Optional[str]) -> List[int]:
        key = adapter if adapter is not None else ""
        order = self._orders.get(key)
        if order is None:
            order = _order_of(key, self._replicas)
            self._orders[key] = order
        return order

    def stats(self) -> Dict[str, object]:
        loads = [self.load(r) for r in self._replicas]
        mean = sum(loads) / len(loads)
        return {
            "replicas": list(self._replicas),
            "loads": loads,
            "max_over_mean": (max(loads) / mean) if mean > 0 else 1.0,
            "num_affinity": self.num_affinity,
            "num_missed": self.num_missed,
            "miss_tokens": self.miss_tokens(),
        }


def holders_of(reports: Sequence[ReplicaReport], adapter: str) -> List[int]:
    """Replicas whose report names ``adapter`` (for tests and logs)."""
    return sorted(r.replica for r in reports if adapter in r.adapters)
