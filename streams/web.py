"""Web views of a worker: health, Prometheus metrics, thresholds, one user's state.

``/users/{user_id}`` exposes personal data (safe pool, blocked tags, flags), so
it answers only with ``Authorization: Bearer <RISKGATE_WEB_TOKEN>``; with no
token configured it is disabled (403), never open.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from .state import UnreadableUser
from .slate_file import item_json

if TYPE_CHECKING:  # pragma: no cover
    from .app import RiskgateApp

__all__ = ["register_views"]

_PROM = "text/plain; version=0.0.4"  # aiohttp adds the charset itself


def _authorised(rg: "RiskgateApp", request) -> bool:
    token = rg.settings.web_token
    if token is None:
        return False
    given = request.headers.get("Authorization", "")
    want = f"Bearer {token.get_secret_value()}"
    # surrogateescape: a header with bytes that are not UTF-8 is a wrong token, not a 500.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), want.encode())


def _refused(rg: "RiskgateApp", web):
    # Without a token the views are disabled, and the answer says how to enable them (an
    # operator read a bare "forbidden" as a wrong token); with one, the request lacked it.
    if rg.settings.web_token is None:
        return web.json({"error": "disabled: set RISKGATE_WEB_TOKEN on the worker to enable this view"}, status=403)
    return web.json({"error": "forbidden: send Authorization: Bearer <RISKGATE_WEB_TOKEN>"}, status=403)


def register_views(rg: "RiskgateApp") -> None:
    app = rg.app

    @app.page("/health")
    async def health(web, request):
        body = {"healthy": rg.healthy, "app_id": rg.settings.app_id, "partitions": sorted(rg.partitions)}
        return web.json(body, status=200 if rg.healthy else 503)

    @app.page("/metrics")
    async def metrics(web, request):
        return web.bytes(rg.metrics.exposition(), content_type=_PROM)

    @app.page("/thresholds")
    async def thresholds(web, request):
        return web.json({"thresholds": rg.latest})

    @app.page("/debug/window-slates")
    async def window_slates(web, request):
        """Every slate in this worker's calibration windows, in ``riskgate calibrate`` input form.

        Lets an operator (and the tests) recompute λ̂ offline from exactly what the
        worker holds. Personal data: token required like ``/users``.
        """
        if not _authorised(rg, request):
            return _refused(rg, web)
        out = []
        for p, part in sorted(rg.partitions.items()):
            horizon = part.engine.calibrator.horizon()
            for uid, state in part.users.items():
                for m in state.live_recent(horizon):
                    out.append({"partition": p, "user_id": uid, "slate_id": m.slate_id, "band": m.band,
                                "k": m.k, "safe_pool_size": m.pool,
                                "items": [item_json(sc, fl) for sc, fl in zip(m.scores, m.flags)]})
        return web.json({"slates": out})

    @app.page("/users/{user_id}")
    async def user(web, request, user_id):
        if not _authorised(rg, request):
            return _refused(rg, web)
        for part in rg.partitions.values():
            try:
                state = part.users.get(user_id)
            except UnreadableUser as e:  # set aside: its events are dead-lettered
                return web.json({"error": str(e), "user_id": user_id}, status=409)
            if state is not None:
                lim = rg.config.limits
                return web.json({
                    "user_id": user_id,
                    "band": state.band,
                    "shown": state.shown,
                    "flagged": state.flagged,
                    "blocked_tags": sorted(state.blocked_tags),
                    "safe_pool": [p.item_id for p in state.safe_pool(lim)],
                    "pending_slates": len(state.pending),
                    "recent_slates": len(state.recent),
                    "history_items": len(state.history),
                })
        return web.json({"error": "user not held by this worker"}, status=404)
