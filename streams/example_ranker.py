"""An example ranker that applies riskgate's thresholds: ``riskgate example-ranker``.

A small HTTP service. ``POST /rank`` with
``{"user_id", "slate_id", "k", "alpha", "strategy", "candidates": [{"item_id", "score", "rank_score", "tags"}]}``
returns the served slate, or 400 with the reason: a bad field (scores must be
finite JSON numbers), an ``alpha`` riskgate does not publish for the strategy, or
a slate whose impression riskgate would dead-letter (checked with riskgate's own
validator before anything is produced); docs/operations.md ("Run the rankers")
describes both bodies and every status. ``GET /health`` answers 503 once the
client no longer follows riskgate's topics (its read loop failed:
:attr:`RankerClient.healthy`), so that an orchestrator restarts it rather than
let it serve old λ̂ for good.

Until its client has caught up with riskgate's outputs (:attr:`RankerClient.ready`)
``/rank`` answers 503, and so does ``GET /ready`` (a readiness probe): before, a
ranker that had just started served users with the ``low`` band's λ̂ and without
their blocked tags until it had read their pools. Started with a ``shard``
(``--shard I/N``), it holds only its shard's pools and answers a request for any
other user with 421 and the shard that holds it (``"shard"``), for the router;
given its shards' addresses (``peers``, ``--peers URL0,URL1,...``), it forwards
such a request to the shard that holds the user instead, so that any load
balancer can spread requests over the shards (one extra hop for the requests
it sent to the wrong one). A forwarded request is never forwarded again.
``GET /metrics`` exports the client's ``riskgate_ranker_*`` series
(:class:`streams.metrics.RankerMetrics`).

A deterministic ``holdout_share`` of slates is served unfiltered
(``policy_applied=false``): only those measure the risk honestly and calibrate
λ̂. Every served slate is produced to ``impressions`` (SPEC §2), so
riskgate sees what users were shown, with the α that was applied.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Sequence

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, web

from calibration.groups import GLOBAL
from calibration.policy import Candidate, in_holdout

from .broker import describe_error
from .metrics import RankerMetrics
from .ranker import RankerClient, Shard, ThresholdBook, same_alpha
from .schemas import InvalidEvent, decode

__all__ = ["make_app", "peer_urls", "serve", "FORWARDED"]

#: Header of a request one shard forwarded to another (its value: the forwarding shard's index).
FORWARDED = "X-Riskgate-Forwarded"
#: How long a shard waits for the shard it forwarded a request to.
FORWARD_TIMEOUT_S = 5.0

log = logging.getLogger("riskgate.example_ranker")

STRATEGIES = ("remove", "replace")


def _id(value, name: str) -> str:
    """An id as text: numbers are taken as their digits, anything else (null, a list, ...) is refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{name} must be a string")
    return str(value)


def _score(value, name: str) -> float:
    """A score as a float: a finite JSON number; a string (even "0.5" or "NaN"), a bool or null is refused."""
    # (float() took "NaN" and "inf": a NaN score fails every score >= λ̂, so the item was dropped without a
    # word, and a non-finite one reaches the impression as null, which riskgate refuses)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _parse(raw: bytes) -> tuple[dict, str, int, float, str, list[Candidate]]:
    """A ``/rank`` body as (body, user_id, k, alpha, strategy, candidates); ``ValueError`` naming what is wrong."""
    body = orjson.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    user_id, k = _id(body["user_id"], "user_id"), int(body["k"])
    alpha, strategy = float(body["alpha"]), str(body.get("strategy", "replace"))
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")
    if not isinstance(body["candidates"], list):
        raise ValueError("candidates must be a list")
    cands = []
    for i, c in enumerate(body["candidates"]):
        if not isinstance(c, dict):
            raise ValueError(f"candidates[{i}] must be an object")
        tags = c.get("tags", [])
        if not isinstance(tags, list):  # (tuple("guns") would be four one-letter tags)
            raise ValueError(f"candidates[{i}].tags must be a list of strings")
        score = _score(c["score"], f"candidates[{i}].score")
        rank_score = _score(c["rank_score"], f"candidates[{i}].rank_score") if "rank_score" in c else score
        cands.append(Candidate(_id(c["item_id"], f"candidates[{i}].item_id"), score, rank_score, tuple(tags)))
    return body, user_id, k, alpha, strategy, cands


def _published_alpha(book: ThresholdBook, alpha: float, strategy: str) -> tuple[float | None, list[float]]:
    """The published α that ``alpha`` matches (``same_alpha``, else None), and every α published for ``strategy``.

    Read from the strategy's ``global`` value, which riskgate writes for every α it
    publishes. Before, an unpublished α resolved to no λ̂ and every slate was
    silently filtered. Without a ``global`` value yet (riskgate has not published)
    nothing is known and the request is served fail-closed, as
    :meth:`ThresholdBook.resolve` does. The impression carries the matched α, so
    that riskgate counts the slate's realised risk under the α it publishes
    (0.050000000000001 was a series of its own, compared with no target).
    """
    msg = book.thresholds.get(f"{strategy}:{GLOBAL}")
    published = sorted(t["alpha"] for t in msg["thresholds"]) if msg else []
    # (the same equality as ThresholdBook.resolve: an α it would match is never refused)
    return next((a for a in published if same_alpha(a, alpha)), None), published


def peer_urls(peers: Sequence[str], shard: Shard | None) -> list[str]:
    """``peers`` as base URLs, once they name every shard of ``shard`` in order; ``ValueError`` saying why not."""
    if peers and (shard is None or len(peers) != shard.count):
        raise ValueError("peers are the base URLs of every shard, in shard order: "
                         + (f"{shard.count}, not {len(peers)}" if shard else
                            "they need a shard (--peers needs --shard I/N)"))
    return [p.rstrip("/") for p in peers]


def make_app(bootstrap: str, prefix: str = "", holdout_share: float = 0.1, shard: Shard | None = None,
             peers: Sequence[str] = (), **kafka_kwargs) -> web.Application:
    peers = peer_urls(peers, shard)
    client = RankerClient(bootstrap, prefix=prefix, shard=shard, **kafka_kwargs)
    metrics = RankerMetrics(client)
    state: dict = {}

    async def on_start(app):
        from aiokafka import AIOKafkaProducer

        await client.start()
        state["peers"] = ClientSession(timeout=ClientTimeout(total=FORWARD_TIMEOUT_S)) if peers else None
        state["producer"] = producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_kwargs)
        try:
            await producer.start()
        except BaseException:  # (the app never started: nothing else stops these)
            await producer.stop()
            await client.stop()
            if state["peers"] is not None:
                await state["peers"].close()
            raise

    async def on_stop(app):
        await client.stop()
        await state["producer"].stop()
        if state["peers"] is not None:
            await state["peers"].close()

    async def forward(request_body: bytes, owner: int) -> web.Response:
        """The answer of shard ``owner`` to this request (502 if it gives none)."""
        try:
            async with state["peers"].post(peers[owner] + "/rank", data=request_body,
                                           headers={FORWARDED: str(shard.index),
                                                    "Content-Type": "application/json"}) as resp:
                return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")
        except (ClientError, asyncio.TimeoutError) as e:
            return web.json_response({"error": f"shard {owner} at {peers[owner]} did not answer: "
                                               f"{describe_error(e)}", "shard": owner}, status=502)

    def on_sent(future) -> None:
        if future.cancelled() or future.exception() is not None:
            metrics.impressions.labels("failed").inc()
            log.error("an impression could not be produced (%s): riskgate will not calibrate on that slate",
                      "cancelled" if future.cancelled() else future.exception())
        else:
            metrics.impressions.labels("sent").inc()

    async def rank(request: web.Request) -> web.Response:
        request_body = await request.read()
        try:
            body, user_id, k, alpha, strategy, cands = _parse(request_body)
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as e:
            return web.json_response({"error": f"bad request: {type(e).__name__}: {e}"}, status=400)
        if not client.ready:  # (fail closed: the book may lack this user's band and blocked tags)
            return web.json_response({"error": "not ready: still reading riskgate's outputs"}, status=503)
        # (before the shard check: every shard holds every risk-thresholds value, so none is forwarded for this)
        matched, published = _published_alpha(client.book, alpha, strategy)
        if published and matched is None:
            return web.json_response({"error": f"alpha {alpha} is not published for strategy {strategy!r}: "
                                               f"riskgate publishes {', '.join(map(str, published))}",
                                      "alphas": published}, status=400)
        alpha = alpha if matched is None else matched
        if not client.owns(user_id):
            owner = client.shard_of(user_id)
            if peers and FORWARDED not in request.headers:  # (once: two shards that disagree do not loop)
                return await forward(request_body, owner)
            return web.json_response({"error": f"user {user_id!r} belongs to shard {owner}, "
                                               f"this is shard {client.shard}", "shard": owner}, status=421)
        slate_id = str(body.get("slate_id") or uuid.uuid4())
        holdout = in_holdout(slate_id, holdout_share)
        if holdout:
            served = [dict(item_id=c.item_id, score=c.score, rank_score=c.rank_score, tags=list(c.tags),
                           replacement=False) for c in cands[:k]]
            decision = {"group": None, "lambda": None, "version": None}
        else:
            d = client.book.apply(user_id, cands, k, alpha, strategy)
            served = [dict(item_id=s.item_id, score=s.score if s.score is not None else 1.0, rank_score=s.rank_score,
                           tags=list(s.tags), replacement=s.replacement) for s in d.slate]
            decision = {"group": d.group, "lambda": d.lam, "version": d.version}
        impression = {"event_id": f"imp-{slate_id}", "user_id": user_id, "slate_id": slate_id, "ts": time.time(),
                      "k": k, "policy_applied": not holdout, "alpha": None if holdout else alpha, "items": served}
        raw, key = orjson.dumps(impression), user_id.encode()
        try:  # riskgate's own check: a slate it would dead-letter is refused here, where the caller sees why
            decode("impressions", raw, key)
        except InvalidEvent as e:
            return web.json_response({"error": f"riskgate would refuse this slate's impression: {e.reason}"},
                                     status=400)
        sent = await state["producer"].send(prefix + "impressions", raw, key=key)
        sent.add_done_callback(on_sent)  # (acknowledged later: the request does not wait for the broker)
        return web.json_response({"slate_id": slate_id, "policy_applied": not holdout, "items": served, **decision})

    def status() -> dict:
        book = client.book
        return {"following": client.healthy, "ready": client.ready, "shard": None if shard is None else str(shard),
                "partitions": list(client.partitions), "thresholds": len(book.thresholds), "pools": len(book.pools),
                "rejected": dict(book.rejected),
                "error": None if client.error is None else describe_error(client.error)}

    async def health(request: web.Request) -> web.Response:  # liveness: 503 once the client failed
        return web.json_response(status(), status=200 if client.healthy else 503)

    async def ready(request: web.Request) -> web.Response:  # readiness: 503 until caught up
        return web.json_response(status(), status=200 if client.ready else 503)

    async def exposition(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_post("/rank", rank)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", exposition)
    app.on_startup.append(on_start)
    app.on_cleanup.append(on_stop)
    return app


def serve(bootstrap: str, port: int, host: str = "127.0.0.1", prefix: str = "", holdout_share: float = 0.1,
          shard: Shard | None = None, peers: Sequence[str] = (), **kafka_kwargs) -> None:
    """Run the example ranker; ``kafka_kwargs`` are aiokafka's security options (SASL/TLS)."""
    web.run_app(make_app(bootstrap, prefix, holdout_share, shard, peers, **kafka_kwargs), host=host, port=port)
