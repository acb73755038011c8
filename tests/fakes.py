"""Stand-ins for what the worker asks of Faust's consumer, for tests of its batch path and flush without a broker."""

from __future__ import annotations


class FakeConsumer:
    """Faust's consumer as the batch path and the flush use it; acks and flow stops are noted in ``log``.

    ``highwater`` is every input partition's log end (records at offsets below it are the last ones),
    or a function of the partition (None: not known yet); ``polled``, a function of the partition:
    when (ms) the fetch that told it was answered.
    """

    def __init__(self, log: list, highwater: int = 3, partitions: int = 2, polled=None):
        self.log, self._highwater, self._partitions = log, highwater, partitions
        self._polled = polled
        self._committed_offset: dict = {}

    def highwater(self, tp):
        return self._highwater(tp) if callable(self._highwater) else self._highwater

    def last_poll_timestamp(self, tp):
        """When (ms) the fetch that told ``highwater(tp)`` was answered: ``polled(tp)``, None if not given."""
        return None if self._polled is None else self._polled(tp)

    def topic_partitions(self, topic):
        return self._partitions

    def ack_offsets(self, tp, offsets):
        self.log.append(("ack", tp.topic, tp.partition, sorted(offsets)))

    def stop_flow(self):
        self.log.append(("stop_flow",))


def fake_send_records(record):
    """:func:`streams.batch_send.send_records` without a broker: ``record(topic, partition, groups)`` per call.

    Awaits ``before_send`` first, once (as the real one does before each batch it queues).
    """

    async def send_records(app, topic, partition, groups, on_sent=None, fence=False, before_send=None):
        if before_send is not None:
            await before_send()
        groups = [list(g) for g in groups]
        record(topic, partition, groups)
        return sum(len(g) for g in groups), 0

    return send_records
