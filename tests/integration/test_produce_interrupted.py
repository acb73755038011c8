"""A broker lost in the middle of ``produce``: the producer says how far it got, and going on from there loses nothing.

The producer talks to the broker through a ``tansu proxy`` (harness.BrokerProxy)
that is cut after a given number of events were handed over. ``produce_events``
must raise :class:`streams.producer.ProduceInterrupted` with a count of leading
events that really are on the broker, and producing again from that count
(``riskgate produce --skip N``) must leave every event on the broker.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from calibration.synthetic import WorldConfig, generate_events
from streams.producer import ProduceInterrupted, produce_events

from .harness import BrokerProxy, make_topics, read_topic

pytestmark = pytest.mark.integration

CUT_AFTER = 1500


def test_a_producer_that_lost_its_broker_says_how_many_events_are_on_it(kafka_bootstrap, topic_prefix, tmp_path):
    events = list(generate_events(WorldConfig(seed=3, n_users=40, n_slates=300)))
    assert len(events) > 2 * CUT_AFTER
    names = make_topics(kafka_bootstrap, topic_prefix, 2)

    with BrokerProxy(kafka_bootstrap, tmp_path) as proxy:
        def cut_midway():
            for i, ev in enumerate(events):
                if i == CUT_AFTER:
                    proxy.cut()
                yield ev

        with pytest.raises(ProduceInterrupted) as raised:
            asyncio.run(produce_events(proxy.bootstrap, cut_midway(), in_flight=200, prefix=topic_prefix,
                                       producer_kwargs={"request_timeout_ms": 3000, "retry_backoff_ms": 100}))
    done = raised.value.acknowledged
    assert 0 < done <= CUT_AFTER and done % 200 == 0, done

    def on_broker() -> set[str]:
        return {orjson.loads(v)["event_id"] for t in names.inputs for _, v, _ in read_topic(kafka_bootstrap, t)}

    first = on_broker()
    assert {v["event_id"] for _, v in events[:done]} <= first  # what it counted is there

    asyncio.run(produce_events(kafka_bootstrap, events[done:], prefix=topic_prefix))  # --skip done
    assert on_broker() == {v["event_id"] for _, v in events}
