"""Whether this worker may still write for its partitions: its lease on the consumer group.

A worker stalled longer than its session timeout (a paused VM, SIGSTOP, a
node frozen under memory pressure) is removed from the group by the broker;
another worker takes its partitions, restores their users from the changelog
and goes on from the committed offsets. When the stalled worker wakes it
still holds users it applied before the stall and never flushed. Kafka fences
its offset *commits* (its generation is gone) but not its writes to the
changelogs. Flushed after the new owner's records, they became the changelog's
last record of each user, and the next restore of those users lost everything
the new owner had applied since: in ``tests/integration/test_stalled_worker.py``,
51 of 133 users lost half their flags, in 3 of 4 runs.

Kafka transactions would fence those writes; tansu has none, and riskgate
does not depend on them. Instead a worker writes only while it holds a lease:

* **The lease** is renewed by every heartbeat the group coordinator answers
  with no error, from the moment that heartbeat was *sent* (the broker counts the session
  from when it got it, which is later), and by each assignment. It is fresh
  for half the session timeout: with the worker's 1 s heartbeats it is
  normally under 1 s old, and the broker cannot give the partitions away
  while it is fresh. A flush, a snapshot or a publication on a stale lease,
  or once the broker has answered that it no longer knows the member, is
  skipped: nothing is lost, since nothing of it was acked.
* **A loss** is a revoke after the coordinator reset this member's
  generation (the broker answered that it no longer knows the member). The
  partitions were someone else's already: what the worker holds of them is
  dropped, not flushed.
* **A rebalance** does not renew it. The coordinator answers heartbeats during
  a rebalance, but drops a member that has not rejoined when the join phase
  ends, one rebalance timeout after it began, whatever its heartbeats (found
  by a review: a worker whose main loop was blocked past that, its consumer
  thread still beating, flushed for up to ~10 s after its partitions had
  moved). Only a heartbeat answered with no error renews it, and its term is
  also at most the rebalance timeout: a lease last renewed before the
  rebalance began runs out before the join phase ends. (A rejoin the worker
  asks for itself, on a metadata change, starts no deadline at the broker,
  whose answers go on renewing the lease until this member's JoinGroup.)
* **A write that outlasts the lease** is checked again before each batch it
  sends (a stall in the middle of a flush: found by the same review, the rest
  of the flush went out unchecked). It waits for the next answered heartbeat,
  or gives up once the broker has dropped the member, a rebalance is pending
  or a whole session went unanswered (:class:`WritesFenced`): what is held
  unflushed is dropped (``RiskgateApp._give_up``), and the worker stops
  unclean if a local store got ahead of its changelog.

What is left unfenced: batches already queued in the producer when the stall
began, sent after it. Closing that needs transactions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["GroupLease", "WritesFenced", "membership_lost", "rejoin_requested"]

#: aiokafka's generation and member id after the coordinator reset them (OffsetCommitRequest.DEFAULT_GENERATION_ID,
#: JoinGroupRequest.UNKNOWN_MEMBER_ID): the broker no longer knows this member, or it never joined.
_NO_GENERATION = -1
_NO_MEMBER = ""
#: The Kafka API key of a Heartbeat request (aiokafka.protocol.group.HeartbeatRequest.API_KEY).
HEARTBEAT_API_KEY = 12


def membership_lost(coordinator) -> bool:
    """Whether the group coordinator ``coordinator`` (aiokafka's) holds no membership: reset, or never joined.

    None (no coordinator to ask) is not a loss: the lease still decides.
    """
    if coordinator is None:
        return False
    return coordinator.generation == _NO_GENERATION or coordinator.member_id == _NO_MEMBER


def rejoin_requested(coordinator) -> bool:
    """Whether ``coordinator`` (aiokafka's) is to rejoin the group: a rebalance is pending, partitions may move."""
    pending = getattr(coordinator, "_rejoin_needed_fut", None)
    return pending is not None and pending.done()


class WritesFenced(RuntimeError):
    """A write given up half-way: the lease ran out and the partitions may be another worker's."""


class GroupLease:
    """The time up to which this worker may assume it still owns its partitions (see the module docstring).

    It binds once it watches a coordinator (at the first assignment): before
    that the worker holds no partition, and a process that never joins a group
    (the benches, the unit tests) has nothing to fence.

    Examples
    --------
    >>> class Coordinator:
    ...     async def _send_req(self, request):
    ...         return None
    >>> now = [100.0]
    >>> lease = GroupLease(session_timeout=6.0, clock=lambda: now[0])
    >>> lease.fresh()  # in no group yet
    True
    >>> lease.watch(Coordinator()); lease.renew(100.0)
    >>> now[0] = 102.9; lease.fresh()
    True
    >>> now[0] = 103.0; lease.fresh(), round(lease.age(), 1)
    (False, 3.0)
    """

    def __init__(self, session_timeout: float, clock: Callable[[], float] = time.monotonic,
                 rebalance_timeout: float | None = None):
        self.session_timeout = float(session_timeout)
        self.rebalance_timeout = float("inf") if rebalance_timeout is None else float(rebalance_timeout)
        self.clock = clock
        self.renewed_at = float("-inf")  # clock time of the newest proof of membership
        self._watched: object | None = None  # the coordinator whose heartbeats renew it

    @property
    def term(self) -> float:
        """How long a renewal keeps the lease fresh: half the session timeout, at most the rebalance timeout."""
        return min(self.session_timeout / 2, self.rebalance_timeout)

    def renew(self, at: float | None = None) -> None:
        """Membership was proven at clock time ``at`` (now when None); renewals never move it back."""
        at = self.clock() if at is None else at
        self.renewed_at = max(self.renewed_at, at)

    def age(self) -> float:
        """Seconds since the newest renewal (inf before any)."""
        return self.clock() - self.renewed_at

    def fresh(self) -> bool:
        """Whether the worker may write: renewed less than :attr:`term` ago, or in no group yet."""
        return self._watched is None or self.age() < self.term

    def held(self) -> bool:
        """Whether the worker may write now: the lease is fresh and the broker has not said the member is gone."""
        return self.fresh() and not self.lost()

    def lost(self) -> bool:
        """Whether the watched coordinator says the broker no longer knows this member."""
        return membership_lost(self._watched)

    def moving(self) -> bool:
        """Whether the partitions may be changing hands: membership lost, or a rebalance pending."""
        return self.lost() or rejoin_requested(self._watched)

    def watch(self, coordinator) -> None:
        """Renew the lease from every heartbeat ``coordinator`` (aiokafka's GroupCoordinator) gets answered
        with no error, from when it was sent.

        Wraps the instance's ``_send_req`` (its heartbeat routine, in the consumer's
        thread, sends through it): aiokafka's own heartbeat call says only True or
        False, and True also for "rebalance in progress". Once per coordinator.
        """
        if coordinator is None or coordinator is self._watched:
            return
        send = coordinator._send_req
        clock = self.clock

        async def _send_req(request):
            sent = clock()
            response = await send(request)
            if getattr(request, "API_KEY", None) == HEARTBEAT_API_KEY and getattr(response, "error_code", None) == 0:
                self.renew(sent)
            return response

        coordinator._send_req = _send_req
        self._watched = coordinator
