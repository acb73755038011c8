"""Security of a running worker (issue 7): Kafka TLS and SASL, the token on personal views, no user data in logs.

**Kafka TLS and SASL.** The local broker (tansu 0.6.0) has neither: its
``--cert``/``--key`` options are accepted and ignored (the listener stays
plaintext), and with ``--authentication`` no SCRAM user can ever log in (users
made with ``tansu user create`` are not stored by its memory or S3 engines).
The evidence is in ``docs/security.md``. So each combination riskgate offers is
tested against a :class:`Gateway` on loopback in front of a dedicated plaintext
tansu: it terminates TLS with a throwaway CA (``trustme``) and/or runs the
broker side of SASL (SCRAM-SHA-256/512 per RFC 5802/7677, or PLAIN) with only
the combination's mechanism enabled, refusing any other request before
authentication like Kafka does, then forwards the connection. tansu advertises
the gateway's port, so every connection (metadata, group coordinator, fetch,
produce, admin) of every client goes through it. That checks riskgate's whole
client side for real, TLS handshakes and SCRAM exchanges included: the
``RISKGATE_SECURITY_PROTOCOL`` / ``SASL_*`` / ``SSL_*`` variables, through
:meth:`Settings.broker_credentials` into Faust and :meth:`Settings.kafka_kwargs`
into plain aiokafka clients (topic creation, the test's producer). The broker's
own side (its credential store, ACLs, TLS listener) needs a real Kafka.

For each combination: (a) a client with the right credentials produces and
consumes a record; (b) plaintext, a client trusting another CA, a missing or
foreign client certificate, a wrong password, an unknown user, another
mechanism, SASL without TLS and TLS without SASL are refused, and nothing they
sent reaches the topic; (c) a real ``riskgate worker`` with those settings
becomes healthy, processes an impression (visible on ``/users/{id}`` with the
token), logs in as its own user (with the configured mechanism, or its own
client certificate), and never writes its password to its log. A worker with a
wrong password stops, saying why, without logging the password.

**Web views.** ``/users/{id}`` and ``/debug/window-slates`` answer 403 without
the token, with a wrong one, or when no token is configured; ``/health``,
``/metrics`` and ``/thresholds`` stay open.

**Logs.** A worker at ``-l info`` consumes events with distinctive user ids,
item ids, tags, slate and event ids (valid, malformed and a forget); none of
those strings is in its log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import os
import secrets
import ssl
import struct
import threading
import time
import uuid
from types import SimpleNamespace

import orjson
import pytest

from streams.broker import LocalBroker, free_port
from streams.settings import load_settings
from streams.topics import Topics

from .harness import TOKEN, Worker, json_of, make_topics, produce_raw, wait_for

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- a TLS / SASL gateway

_API_VERSIONS, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 18, 17, 36
_UNSUPPORTED_SASL_MECHANISM, _SASL_AUTHENTICATION_FAILED = 33, 58
_SCRAM_HASH = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
_SCRAM_ITERATIONS = 4096


class _Refused(Exception):
    pass


def _kafka_frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    if not 0 < size <= 1 << 20:
        raise _Refused(f"frame of {size} bytes")
    return await reader.readexactly(size)


def _request_header(frame: bytes) -> tuple[int, int, int, str | None, int]:
    """api_key, api_version, correlation_id, client_id and the body's offset (non-flexible header v1)."""
    api_key, version, correlation_id, n = struct.unpack_from(">hhih", frame, 0)
    client_id = frame[10:10 + n].decode("utf-8", "replace") if n >= 0 else None
    return api_key, version, correlation_id, client_id, 10 + max(n, 0)


def _kstring(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">h", -1)
    b = s.encode()
    return struct.pack(">h", len(b)) + b


class _Scram:
    """The server side of one SCRAM-SHA-256/512 exchange (RFC 5802), as a Kafka broker runs it."""

    def __init__(self, mechanism: str, users: dict[str, str]):
        self.hash = _SCRAM_HASH[mechanism]
        self.users = users
        self.user: str | None = None

    def first(self, token: bytes) -> bytes:
        text = token.decode()
        if not text.startswith("n,,"):
            raise _Refused("channel binding or authzid in client-first")
        self.bare = text[3:]
        attrs = dict(p.split("=", 1) for p in self.bare.split(","))
        self.user = attrs["n"].replace("=2C", ",").replace("=3D", "=")
        self.nonce = attrs["r"] + secrets.token_urlsafe(18)
        self.salt = os.urandom(16)
        self.server_first = f"r={self.nonce},s={base64.b64encode(self.salt).decode()},i={_SCRAM_ITERATIONS}"
        return self.server_first.encode()

    def final(self, token: bytes) -> bytes:
        without_proof, _, proof = token.decode().rpartition(",p=")
        attrs = dict(p.split("=", 1) for p in without_proof.split(","))
        if attrs.get("r") != self.nonce or attrs.get("c") != "biws":
            raise _Refused("nonce or channel binding mismatch")
        password = self.users.get(self.user)
        if password is None:  # answered only now, as Kafka does: no user enumeration at the first step
            raise _Refused(f"unknown user {self.user!r}")
        h = self.hash
        salted = hashlib.pbkdf2_hmac(h, password.encode(), self.salt, _SCRAM_ITERATIONS)
        client_key = hmac.new(salted, b"Client Key", h).digest()
        stored_key = hashlib.new(h, client_key).digest()
        auth_message = f"{self.bare},{self.server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, h).digest()
        if not hmac.compare_digest(base64.b64decode(proof), bytes(a ^ b for a, b in zip(client_key, signature))):
            raise _Refused(f"wrong password for {self.user!r}")
        server_key = hmac.new(salted, b"Server Key", h).digest()
        return b"v=" + base64.b64encode(hmac.new(server_key, auth_message, h).digest())


class Gateway:
    """TLS termination and/or broker-side SASL on 127.0.0.1, forwarding to a plaintext broker (test only).

    ``ssl_context``: a server context (TLS listener) or None. ``mechanism``: the
    one SASL mechanism enabled (``PLAIN``, ``SCRAM-SHA-256``, ``SCRAM-SHA-512``)
    or None for no SASL; ``users`` maps names to passwords. Every connection is
    recorded in ``sessions`` (client id, SASL user, the DNS name of the client
    certificate when the context requires one, outcome). Before authentication
    only ApiVersions (forwarded), SaslHandshake v1 and SaslAuthenticate v0/v1
    (answered here) are accepted; anything else closes the connection.
    """

    def __init__(self, upstream_port: int, ssl_context: ssl.SSLContext | None = None, mechanism: str | None = None,
                 users: dict[str, str] | None = None):
        self.upstream_port = upstream_port
        self.ssl_context = ssl_context
        self.mechanism = mechanism
        self.users = dict(users or {})
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.sessions: list[dict] = []
        self._lock = threading.Lock()

    # ---- lifecycle (an event loop in a thread of its own)

    def start(self) -> "Gateway":
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"gateway-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the gateway did not start")
        return self

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(lambda _loop, _ctx: None)  # failed TLS handshakes are expected here
        server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                              ssl=self.ssl_context))
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(loop)
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def outcomes(self) -> list[dict]:
        with self._lock:
            return [dict(s) for s in self.sessions]

    # ---- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cert = writer.get_extra_info("peercert")  # only when the context asks for client certificates
        peer = next((v for k, v in (cert or {}).get("subjectAltName", ()) if k == "DNS"), None)
        session = {"client_id": None, "user": None, "peer": peer, "outcome": "open"}
        with self._lock:
            self.sessions.append(session)
        up_writer = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            if self.mechanism is None:
                frame = await _read_frame(reader)
                session["client_id"] = _request_header(frame)[3]
                up_writer.write(_kafka_frame(frame))
                session["outcome"] = "connected"
            else:
                await self._authenticate(session, reader, writer, up_reader, up_writer)
                session["outcome"] = "authenticated"
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except _Refused as e:
            session["outcome"] = f"refused: {e}"
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError, UnicodeDecodeError) as e:
            if session["outcome"] == "open":
                session["outcome"] = f"closed: {type(e).__name__}"
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()

    async def _authenticate(self, session, reader, writer, up_reader, up_writer) -> None:
        mechanism, scram = None, None
        while True:
            frame = await _read_frame(reader)
            api_key, version, correlation_id, client_id, off = _request_header(frame)
            session["client_id"] = client_id

            def answer(body: bytes) -> None:
                writer.write(_kafka_frame(struct.pack(">i", correlation_id) + body))

            if api_key == _API_VERSIONS:
                up_writer.write(_kafka_frame(frame))
                await up_writer.drain()
                writer.write(_kafka_frame(await _read_frame(up_reader)))
            elif api_key == _SASL_HANDSHAKE and version == 1 and mechanism is None:
                (n,) = struct.unpack_from(">h", frame, off)
                wanted = frame[off + 2:off + 2 + n].decode()
                ok = wanted == self.mechanism
                answer(struct.pack(">hi", 0 if ok else _UNSUPPORTED_SASL_MECHANISM, 1) + _kstring(self.mechanism))
                if not ok:
                    await writer.drain()
                    raise _Refused(f"mechanism {wanted} not enabled")
                mechanism = wanted
                scram = _Scram(wanted, self.users) if wanted in _SCRAM_HASH else None
            elif api_key == _SASL_AUTHENTICATE and version in (0, 1) and mechanism is not None:
                (n,) = struct.unpack_from(">i", frame, off)
                token = frame[off + 4:off + 4 + n]
                tail = struct.pack(">q", 0) if version >= 1 else b""  # session_lifetime_ms (v1)
                try:
                    if scram is None:  # PLAIN: authzid NUL authcid NUL password
                        authzid, user, password = token.decode().split("\0")
                        session["user"] = user
                        if authzid not in ("", user) or not hmac.compare_digest(
                                password.encode(), self.users.get(user, "\0").encode()):
                            raise _Refused(f"wrong password or unknown user {user!r}")
                        reply, done = b"", True
                    elif scram.user is None:
                        reply, done = scram.first(token), False
                        session["user"] = scram.user
                    else:
                        reply, done = scram.final(token), True
                except _Refused as e:
                    answer(struct.pack(">h", _SASL_AUTHENTICATION_FAILED) + _kstring(f"Authentication failed: {e}")
                           + struct.pack(">i", 0) + tail)
                    await writer.drain()
                    raise
                answer(struct.pack(">h", 0) + _kstring(None) + struct.pack(">i", len(reply)) + reply + tail)
                if done:
                    session["mechanism"] = mechanism
                    await writer.drain()
                    return
            else:
                raise _Refused(f"request {api_key} v{version} before authentication")
            await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


# --------------------------------------------------------------------------- clients


async def _produce(bootstrap: str, topic: str, records, **client_kwargs) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=10_000, **client_kwargs)
    try:
        await asyncio.wait_for(p.start(), 30)
        for key, value in records:
            await asyncio.wait_for(p.send_and_wait(topic, value, key=key), 30)
    finally:
        await p.stop()


async def _read_all(bootstrap: str, topic: str, **client_kwargs) -> list[tuple[bytes | None, bytes]]:
    """Every record of ``topic`` (one partition) up to its end, read by the fetch highwater (TANSU_NOTES)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tp = TopicPartition(topic, 0)
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=10_000,
                         **client_kwargs)
    try:
        await asyncio.wait_for(c.start(), 30)
        c.assign([tp])
        await c.seek_to_beginning(tp)
        out, deadline = [], time.monotonic() + 30
        while c.highwater(tp) is None or await c.position(tp) < c.highwater(tp):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end")
            for msgs in (await c.getmany(tp, timeout_ms=200)).values():
                out += [(m.key, m.value) for m in msgs]
        return out
    finally:
        await c.stop()


def _refusal(bootstrap: str, topic: str, **client_kwargs) -> str:
    """Try to produce one record with ``client_kwargs``; the error text. Fails the test if the record went through."""
    from aiokafka.errors import KafkaError

    try:
        asyncio.run(_produce(bootstrap, topic, [(b"k", b"must-not-arrive")], **client_kwargs))
    except (KafkaError, OSError, asyncio.TimeoutError, ssl.SSLError) as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"a client with {sorted(client_kwargs)} was let through")


# --------------------------------------------------------------------------- one secured broker per combination

COMBOS = [  # (RISKGATE_SECURITY_PROTOCOL, RISKGATE_SASL_MECHANISM, client certificates required)
    pytest.param(("SSL", None, False), id="ssl"),
    pytest.param(("SSL", None, True), id="ssl-client-certificate"),
    pytest.param(("SASL_PLAINTEXT", "SCRAM-SHA-256", False), id="sasl_plaintext-scram-sha-256"),
    pytest.param(("SASL_SSL", "SCRAM-SHA-512", False), id="sasl_ssl-scram-sha-512"),
    pytest.param(("SASL_SSL", "PLAIN", False), id="sasl_ssl-plain"),
]
USERS = ("rg-client", "rg-worker")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A throwaway CA, a server certificate for 127.0.0.1 and client certificates (``<user>.client.test``).

    ``server`` is the listener's context; ``server_mtls`` also requires a client
    certificate from the CA. ``other_ca`` and its ``rogue`` client certificate
    must both be refused.
    """
    import trustme

    d = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server)
    server_mtls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(d / "ca.pem"))
    server_mtls.verify_mode = ssl.CERT_REQUIRED
    server_cert.configure_cert(server_mtls)
    clients = {}
    for name, issuer in [(u, ca) for u in USERS] + [("rogue", other)]:
        leaf = issuer.issue_cert(f"{name}.client.test")
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
        clients[name] = (d / f"{name}.pem", d / f"{name}.key")
    return SimpleNamespace(ca=d / "ca.pem", other_ca=d / "other-ca.pem", server=server, server_mtls=server_mtls,
                           clients=clients)


@pytest.fixture
def secured(request, tls, tmp_path):
    """A dedicated tansu behind a gateway for one combination; credentials for two users (the test, the worker)."""
    protocol, mechanism, mtls = request.param
    users = {u: f"{u}-" + secrets.token_hex(8) for u in USERS}
    server = (tls.server_mtls if mtls else tls.server) if protocol.endswith("SSL") else None
    gw = Gateway(0, server, mechanism, users)
    broker = LocalBroker(log_path=str(tmp_path / "tansu.log"), advertised_port=gw.port)
    gw.upstream_port = broker.port
    with gw, broker:

        def settings(user: str | None = "rg-client", password: str | None = None, **overrides):
            values = dict(broker=f"kafka://{gw.bootstrap}", security_protocol=protocol)
            if mechanism:
                values.update(sasl_mechanism=mechanism, sasl_username=user,
                              sasl_password=password if password is not None else users[user])
            if protocol.endswith("SSL"):
                values["ssl_cafile"] = tls.ca
            if mtls and user in tls.clients:
                values["ssl_certfile"], values["ssl_keyfile"] = tls.clients[user]
            values.update(overrides)
            return values

        yield SimpleNamespace(protocol=protocol, mechanism=mechanism, mtls=mtls, users=users, gateway=gw, tansu=broker,
                              bootstrap=gw.bootstrap, settings=settings,
                              client=lambda **kw: load_settings(**settings(**kw)).kafka_kwargs())


@pytest.mark.parametrize("secured", COMBOS, indirect=True)
def test_right_credentials_produce_and_consume(secured, unique_name):
    from streams.broker import create_topics

    topic = unique_name("sec")
    kw = secured.client()
    create_topics(secured.bootstrap, [topic], 1, **kw)
    asyncio.run(_produce(secured.bootstrap, topic, [(b"k", b"hello")], **kw))
    assert asyncio.run(_read_all(secured.bootstrap, topic, **kw)) == [(b"k", b"hello")]
    _assert_logged_in(secured, secured.gateway.outcomes(), "rg-client")


def _assert_logged_in(secured, sessions: list[dict], user: str) -> None:
    """Connections went through the gateway, none was refused, and every login was ``user`` with the mechanism."""
    assert not [s for s in sessions if s["outcome"].startswith("refused")], sessions
    if secured.mtls:  # each connection presented the user's own client certificate
        assert sessions and {s["peer"] for s in sessions} == {f"{user}.client.test"}, sessions
    if secured.mechanism:
        logins = {(s.get("mechanism"), s["user"]) for s in sessions if s["outcome"] == "authenticated"}
        assert logins == {(secured.mechanism, user)}, sessions
    else:
        assert any(s["outcome"] == "connected" for s in sessions), sessions


def _bad_clients(secured, tls) -> dict[str, dict]:
    """The ways in that must fail for this combination, as aiokafka client kwargs."""
    p, m = secured.protocol, secured.mechanism
    bad: dict[str, dict] = {"plaintext": {}}
    if p.endswith("SSL"):
        bad["tls trusting another CA"] = secured.client(ssl_cafile=tls.other_ca)
        if m:
            bad["no TLS (SASL_PLAINTEXT)"] = secured.client(security_protocol="SASL_PLAINTEXT")
            bad["TLS without SASL"] = secured.client(security_protocol="SSL", sasl_username=None, sasl_password=None)
    if secured.mtls:
        bad["no client certificate"] = secured.client(ssl_certfile=None, ssl_keyfile=None)
        bad["client certificate from another CA"] = secured.client(ssl_certfile=tls.clients["rogue"][0],
                                                                   ssl_keyfile=tls.clients["rogue"][1])
    if m:
        bad["wrong password"] = secured.client(password="not-the-password")
        bad["unknown user"] = secured.client(user="rg-nobody", password="whatever")
        other = "SCRAM-SHA-512" if m != "SCRAM-SHA-512" else "SCRAM-SHA-256"
        bad[f"mechanism {other}"] = secured.client(sasl_mechanism=other)
    return bad


@pytest.mark.parametrize("secured", COMBOS, indirect=True)
def test_wrong_credentials_and_missing_tls_are_refused(secured, tls, unique_name):
    from streams.broker import create_topics

    topic = unique_name("sec")
    create_topics(secured.bootstrap, [topic], 1, **secured.client())
    before = len(secured.gateway.outcomes())
    errors = {what: _refusal(secured.bootstrap, topic, **kw) for what, kw in _bad_clients(secured, tls).items()}
    # nothing a refused client sent reached the broker
    assert asyncio.run(_read_all(secured.bootstrap, topic, **secured.client())) == []
    refused = [s for s in secured.gateway.outcomes()[before:] if s["outcome"] not in ("authenticated", "connected")]
    if secured.mechanism:  # the gateway saw the SASL refusals, so they were refused for the credentials
        reasons = " | ".join(s["outcome"] for s in refused)
        assert "wrong password" in reasons and "unknown user 'rg-nobody'" in reasons, (reasons, errors)
        assert "not enabled" in reasons and "before authentication" in reasons, (reasons, errors)


@pytest.mark.parametrize("secured", COMBOS, indirect=True)
def test_worker_connects_and_processes_an_impression(secured, tmp_path, unique_name):
    prefix = unique_name("sec") + "."
    Topics(prefix).create(secured.bootstrap, 1, **secured.client())
    worker_settings = {k: v for k, v in secured.settings(user="rg-worker").items() if k != "broker" and v is not None}
    w = Worker(secured.bootstrap, unique_name("app"), tmp_path / "data", tmp_path, 1, prefix, **worker_settings)
    uid = f"u-{uuid.uuid4().hex[:8]}"
    impression = {"event_id": f"e-{uid}", "user_id": uid, "slate_id": f"s-{uid}", "ts": 1.7e9, "k": 2,
                  "policy_applied": False,
                  "items": [{"item_id": "i1", "score": 0.9, "rank_score": 1.0, "tags": ["t"]},
                            {"item_id": "i2", "score": 0.2, "rank_score": 0.5}]}
    w.start()
    try:
        w.wait_healthy(90)
        asyncio.run(_produce(secured.bootstrap, prefix + "impressions", [(uid.encode(), orjson.dumps(impression))],
                             **secured.client()))

        def seen():
            status, body = w.get(f"/users/{uid}", token=True)
            return json_of(body) if status == 200 else None

        view = wait_for(seen, 60, what=f"/users/{uid} on the worker (log {w.log_path})")
        assert view["user_id"] == uid and view["history_items"] == 2
    finally:
        w.stop()
    # the worker's own (Faust) clients came through the gateway, logged in as its user with the configured mechanism
    _assert_logged_in(secured, [s for s in secured.gateway.outcomes() if (s["client_id"] or "").startswith("faust")],
                      "rg-worker")
    log = w.log_path.read_text(errors="replace")
    assert secured.users["rg-worker"] not in log


@pytest.mark.parametrize("secured", [c for c in COMBOS if c.id == "sasl_ssl-scram-sha-512"], indirect=True)
def test_worker_with_a_wrong_password_stops_and_does_not_log_it(secured, tmp_path, unique_name):
    prefix = unique_name("sec") + "."
    Topics(prefix).create(secured.bootstrap, 1, **secured.client())
    wrong = "wrong-" + secrets.token_hex(8)
    worker_settings = {k: v for k, v in secured.settings(user="rg-worker", password=wrong).items()
                       if k != "broker" and v is not None}
    w = Worker(secured.bootstrap, unique_name("app"), tmp_path / "data", tmp_path, 1, prefix, **worker_settings)
    w.start()
    try:
        wait_for(lambda: w.proc.poll() is not None, 60, what="the worker to give up")
    finally:
        w.stop()
    log = w.log_path.read_text(errors="replace")
    assert w.proc.returncode != 0
    assert "SaslAuthenticationFailed" in log, log[-3000:]  # the operator learns why (docs/operations.md runbook)
    assert wrong not in log and secured.users["rg-worker"] not in log


# --------------------------------------------------------------------------- web views and logs (any broker)

_S = uuid.uuid4().hex[:12]  # in every sensitive string: none of them can appear in a log by chance
SENSITIVE = SimpleNamespace(user=f"user-{_S}", gone=f"gone-{_S}", other=f"other-{_S}",
                            items=[f"item-{_S}-a", f"item-{_S}-b"], tags=[f"tag-{_S}-firearms", f"tag-{_S}-sport"],
                            slate=f"slate-{_S}", event=f"evt-{_S}")


def _sensitive_events() -> list[tuple[str, bytes, bytes]]:
    """(topic, key, value): valid events of two users, malformed ones full of their data, and a forget."""
    s, ts = SENSITIVE, 1.7e9
    u, g, (a, b), (t1, t2) = s.user, s.gone, s.items, s.tags
    items = [{"item_id": a, "score": 0.9, "rank_score": 2.0, "tags": [t1]},
             {"item_id": b, "score": 0.3, "rank_score": 1.0, "tags": [t2]}]
    valid = [
        ("impressions", u, {"event_id": f"{s.event}-1", "user_id": u, "slate_id": s.slate, "ts": ts, "k": 2,
                            "policy_applied": False, "items": items}),
        ("watch", u, {"event_id": f"{s.event}-2", "user_id": u, "item_id": a, "watch_ms": 9000,
                      "duration_ms": 10000, "ts": ts + 1}),
        ("flags", u, {"event_id": f"{s.event}-3", "user_id": u, "item_id": b, "kind": "report", "ts": ts + 2}),
        ("constraints", u, {"event_id": f"{s.event}-4", "user_id": u, "block_tags": [t1], "unblock_tags": [],
                            "source": "declared", "ts": ts + 3}),
        ("impressions", g, {"event_id": f"{s.event}-5", "user_id": g, "slate_id": f"{s.slate}-g", "ts": ts, "k": 2,
                            "policy_applied": False, "items": items}),
        ("forget", g, {"event_id": f"{s.event}-6", "user_id": g, "ts": ts + 4}),
    ]
    out = [(t, k.encode(), orjson.dumps(v)) for t, k, v in valid]
    bad_score = dict(valid[0][2], event_id=f"{s.event}-7", items=[dict(items[0], score="high")])
    out += [
        ("impressions", u.encode(), orjson.dumps(bad_score)),  # schema: a string score
        ("flags", s.other.encode(), orjson.dumps(dict(valid[2][2], event_id=f"{s.event}-8"))),  # key mismatch
        ("watch", u.encode(), orjson.dumps(dict(valid[1][2], event_id=f"{s.event}-9", watch_ms=-1))),
        ("constraints", u.encode(), f'{{"user_id": "{u}", "block_tags": ["{t1}"], oops'.encode()),  # bad JSON
        ("forget", g.encode(), orjson.dumps({"event_id": f"{s.event}-10", "user_id": g})),  # no ts
    ]
    return out


def _strings() -> list[str]:
    s = SENSITIVE
    return [s.user, s.gone, s.other, *s.items, *s.tags, s.slate, s.event, _S]


@pytest.fixture(scope="module")
def plain_worker(kafka_bootstrap, tmp_path_factory):
    """One worker at ``-l info`` (the harness's level) that consumed the sensitive events.

    ``test_no_user_data_in_the_log_at_info`` stops it to read its whole log, so
    it comes after the other tests that use this worker.
    """
    tmp = tmp_path_factory.mktemp("security")
    app_id = f"rg-sec-{uuid.uuid4().hex[:8]}"
    prefix = app_id + "."
    make_topics(kafka_bootstrap, prefix, 2)
    events = _sensitive_events()
    produce_raw(kafka_bootstrap, [(prefix + t, k, v) for t, k, v in events])
    w = Worker(kafka_bootstrap, app_id, tmp / "data", tmp, 2, prefix).start()
    try:
        w.wait_healthy()
        wait_for(lambda: w.metric("riskgate_events_total") >= len(events), 90,
                 what=f"the worker to consume {len(events)} events (log {w.log_path})")
        wait_for(lambda: w.get(f"/users/{SENSITIVE.user}", token=True)[0] == 200, 60, what="the user's view")
        yield w
    finally:
        w.stop()


def _get(port: int, path: str, authorization: bytes | None = None) -> tuple[int, bytes]:
    """GET with an Authorization header given as raw bytes (or none)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path)
        if authorization is not None:
            conn.putheader("Authorization", authorization)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


WRONG_AUTHORIZATION = [
    None,  # no header
    b"Bearer wrong-token",
    TOKEN.encode(),  # the token without the scheme
    b"Basic " + base64.b64encode(b"riskgate:" + TOKEN.encode()),
    b"Bearer " + TOKEN.encode()[:-1],  # a prefix of the token
    b"Bearer " + TOKEN.encode() + b"x",  # the token plus a character
    b"Bearer  " + TOKEN.encode(),
    b"Bearer ",
    b"Bearer",
]


def test_personal_views_need_the_token(plain_worker):
    w, uid = plain_worker, SENSITIVE.user
    for path in (f"/users/{uid}", "/debug/window-slates", f"/users/{uid}?token={TOKEN}"):
        for auth in WRONG_AUTHORIZATION:
            status, body = _get(w.port, path, auth)
            assert status in (401, 403), (path, auth, status)
            assert uid.encode() not in body and _S.encode() not in body, (path, auth, body)
    # no existence oracle: a user it does not hold answers like one it holds
    assert _get(w.port, "/users/nobody-here")[0] == _get(w.port, f"/users/{uid}")[0]
    status, body = _get(w.port, f"/users/{uid}", b"Bearer " + TOKEN.encode())
    assert status == 200 and json_of(body)["user_id"] == uid
    assert json_of(body)["blocked_tags"] == [SENSITIVE.tags[0]]
    status, body = _get(w.port, "/debug/window-slates", b"Bearer " + TOKEN.encode())
    assert status == 200 and "slates" in json_of(body)


def test_a_non_utf8_authorization_header_is_refused(plain_worker):
    status, body = _get(plain_worker.port, f"/users/{SENSITIVE.user}", b"Bearer \xff\xfe" + TOKEN.encode())
    assert status in (401, 403), (status, body)


def test_health_metrics_and_thresholds_stay_open(plain_worker):
    for path in ("/health", "/metrics", "/thresholds"):
        status, _ = _get(plain_worker.port, path)
        assert status == 200, path
    assert "thresholds" in json_of(_get(plain_worker.port, "/thresholds")[1])
    assert b"riskgate_events_total" in _get(plain_worker.port, "/metrics")[1]


def test_no_user_data_in_the_log_at_info(plain_worker):
    w = plain_worker
    assert w.get(f"/users/{SENSITIVE.gone}", token=True)[0] == 404  # the forget was applied
    assert w.metric("riskgate_dlq_total") >= 5  # the malformed events were handled
    w.stop()  # whatever it logs on the way out counts too
    log = w.log_path.read_text(errors="replace")
    assert "[^Worker]: Ready" in log, log[-3000:]  # a real info-level log, not an empty file
    leaked = [s for s in _strings() if s in log]
    assert not leaked, f"user data in {w.log_path}: {leaked}"
    assert TOKEN not in log


def test_an_empty_web_token_fails_at_start_naming_the_setting(kafka_bootstrap, tmp_path, unique_name):
    # An empty token would make the expected header "Bearer " (which HTTP cannot even send):
    # a configuration mistake, refused at start rather than silently closing the views.
    w = Worker(kafka_bootstrap, unique_name("app"), tmp_path / "data", tmp_path, 1, unique_name("e") + ".")
    w.env["RISKGATE_WEB_TOKEN"] = ""
    w.start()
    assert w.proc.wait(60) == 2
    assert "RISKGATE_WEB_TOKEN" in w.log_path.read_text()


def test_personal_views_are_disabled_without_a_configured_token(kafka_bootstrap, tmp_path, unique_name):
    prefix = unique_name("notoken") + "."
    make_topics(kafka_bootstrap, prefix, 1)
    w = Worker(kafka_bootstrap, unique_name("app"), tmp_path / "data", tmp_path, 1, prefix)
    w.env.pop("RISKGATE_WEB_TOKEN")
    w.start()
    try:
        w.wait_healthy()
        for path in ("/users/anyone", "/debug/window-slates"):
            for auth in (None, b"Bearer " + TOKEN.encode(), b"Bearer ", b"Bearer None", b"Bearer null"):
                status, body = _get(w.port, path, auth)
                assert status in (401, 403), (path, auth)
                assert "set RISKGATE_WEB_TOKEN" in json_of(body)["error"]  # how to enable it, not "forbidden"
        assert _get(w.port, "/health")[0] == 200
    finally:
        w.stop()
