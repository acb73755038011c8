"""An example ranker that applies riskgate's thresholds: ``riskgate example-ranker``.

A small HTTP service. ``POST /rank`` with
``{"user_id", "slate_id", "k", "alpha", "strategy", "candidates": [{"item_id", "score", "rank_score", "tags"}]}``
returns the served slate. ``GET /health`` answers 503 once the client no longer
follows riskgate's topics (its read loop failed: :attr:`RankerClient.healthy`), so
that an orchestrator restarts it rather than let it serve old λ̂ for good.

A deterministic ``holdout_share`` of slates is served unfiltered
(``policy_applied=false``): only those measure the risk honestly and calibrate
λ̂. Every served slate is produced to ``impressions`` (SPEC §2), so
riskgate sees what users were shown, with the α that was applied.
"""

from __future__ import annotations

import time
import uuid

import orjson
from aiohttp import web

from calibration.policy import Candidate, in_holdout

from .ranker import RankerClient

__all__ = ["make_app", "serve"]


def make_app(bootstrap: str, prefix: str = "", holdout_share: float = 0.1, **kafka_kwargs) -> web.Application:
    client = RankerClient(bootstrap, prefix=prefix, **kafka_kwargs)
    state: dict = {}

    async def on_start(app):
        from aiokafka import AIOKafkaProducer

        await client.start()
        state["producer"] = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_kwargs)
        await state["producer"].start()

    async def on_stop(app):
        await client.stop()
        await state["producer"].stop()

    async def rank(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            user_id, k = str(body["user_id"]), int(body["k"])
            alpha, strategy = float(body["alpha"]), str(body.get("strategy", "replace"))
            cands = [Candidate(str(c["item_id"]), float(c["score"]), float(c.get("rank_score", c["score"])),
                               tuple(c.get("tags", ()))) for c in body["candidates"]]
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as e:
            return web.json_response({"error": f"bad request: {e}"}, status=400)
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
        await state["producer"].send(prefix + "impressions", orjson.dumps(impression), key=user_id.encode())
        return web.json_response({"slate_id": slate_id, "policy_applied": not holdout, "items": served, **decision})

    async def health(request: web.Request) -> web.Response:
        book = client.book
        body = {"following": client.healthy, "thresholds": len(book.thresholds), "pools": len(book.pools),
                "rejected": dict(book.rejected),
                "error": None if client.error is None else f"{type(client.error).__name__}: {client.error}"}
        return web.json_response(body, status=200 if client.healthy else 503)

    app = web.Application()
    app.router.add_post("/rank", rank)
    app.router.add_get("/health", health)
    app.on_startup.append(on_start)
    app.on_cleanup.append(on_stop)
    return app


def serve(bootstrap: str, port: int, host: str = "127.0.0.1", prefix: str = "", holdout_share: float = 0.1,
          **kafka_kwargs) -> None:
    """Run the example ranker; ``kafka_kwargs`` are aiokafka's security options (SASL/TLS)."""
    web.run_app(make_app(bootstrap, prefix, holdout_share, **kafka_kwargs), host=host, port=port)
