"""The example ranker against a real broker: it follows riskgate's outputs and applies Algorithm 1."""

import asyncio
import math

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from calibration.engine import EngineConfig, GroupResult
from calibration.safe_pool import SafeItem
from calibration.threshold import Threshold
from streams.example_ranker import make_app
from streams.topics import safe_pool_message, threshold_message

from .harness import make_topics, produce_raw, read_topic, wait_for

pytestmark = pytest.mark.integration


def test_ranker_applies_published_threshold_and_reports_the_impression(kafka_bootstrap, topic_prefix):
    names = make_topics(kafka_bootstrap, topic_prefix, 2)
    cfg = EngineConfig(alphas=(0.1,))
    result = GroupResult("replace", "global", 500, (0.0, 1.0), (Threshold(0.1, 0.5, False, 0.08),))
    produce_raw(kafka_bootstrap, [
        (names.thresholds, b"replace:global", threshold_message(result, cfg, 3)),
        (names.safe_pools, b"u1", safe_pool_message("u1", [SafeItem("safe-1", 9.0)], ["guns"], band="low")),
    ])
    request = {"user_id": "u1", "slate_id": "s1", "k": 3, "alpha": 0.1, "strategy": "replace",
               "candidates": [{"item_id": "a", "score": 0.9, "rank_score": 3.0},
                              {"item_id": "b", "score": 0.2, "rank_score": 2.0},
                              {"item_id": "c", "score": 0.8, "rank_score": 1.0, "tags": ["guns"]}]}

    async def run():
        app = make_app(kafka_bootstrap, prefix=topic_prefix, holdout_share=0.0)
        async with TestClient(TestServer(app)) as client:
            deadline = asyncio.get_running_loop().time() + 30
            while True:  # until the ranker has caught up (503 before) and read the published threshold
                resp = await client.post("/rank", data=orjson.dumps(request))
                body = await resp.json()
                if resp.status == 200 and body["lambda"] is not None or asyncio.get_running_loop().time() > deadline:
                    break
                assert resp.status in (200, 503), body
                await asyncio.sleep(0.2)
            health = await client.get("/health")
            ready = await client.get("/ready")
            metrics = await (await client.get("/metrics")).text()
            return body, health.status, await health.json(), ready.status, metrics

    body, status, health, ready, metrics = asyncio.run(run())
    assert status == 200 and health["following"] and health["thresholds"] == 1 and health["pools"] == 1
    assert ready == 200 and health["ready"] and health["partitions"] == [0, 1]
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples[("riskgate_ranker_ready", ())] == 1 and samples[("riskgate_ranker_pools", ())] == 1
    assert samples[("riskgate_ranker_threshold_version", (("group", "global"), ("strategy", "replace")))] == 3
    assert samples[("riskgate_ranker_lag_records", (("topic", names.safe_pools),))] == 0
    assert (body["group"], body["lambda"], body["version"], body["policy_applied"]) == ("global", 0.5, 3, True)
    assert [(i["item_id"], i["replacement"]) for i in body["items"]] == [("a", False), ("safe-1", True)]
    imps = wait_for(lambda: [orjson.loads(v) for _, v, _ in read_topic(kafka_bootstrap, names.inputs[0])
                             if orjson.loads(v)["slate_id"] == "s1"], 30, what="the impression")
    assert imps[-1]["policy_applied"] is True and imps[-1]["alpha"] == 0.1
    assert [i["item_id"] for i in imps[-1]["items"]] == ["a", "safe-1"]
    from streams.schemas import decode

    assert decode("impressions", orjson.dumps(imps[-1]), b"u1").policy_applied  # riskgate accepts it


def test_sharded_ranker_clients_split_the_pools_and_each_is_ready_with_its_whole_share(kafka_bootstrap, topic_prefix):
    """Three shards of an 8-partition ``safe-pools`` hold disjoint shares that make up the whole book.

    The pools are produced as riskgate writes them: keyed by user id, placed by
    Kafka's default partitioner. Each client is ready only once it holds every
    pool of its share written before it started, and every replica holds every
    group's threshold.
    """
    from streams.ranker import RankerClient, Shard
    from streams.topics import key_partition

    names = make_topics(kafka_bootstrap, topic_prefix, 8)
    cfg = EngineConfig(alphas=(0.1,))
    result = GroupResult("replace", "global", 500, (0.0, 1.0), (Threshold(0.1, 0.5, False, 0.08),))
    users = [f"user-{i}" for i in range(240)]
    produce_raw(kafka_bootstrap, [(names.thresholds, b"replace:global", threshold_message(result, cfg, 3))]
                + [(names.safe_pools, u.encode(), safe_pool_message(u, [SafeItem(f"{u}-safe", 1.0)], [], band="low"))
                   for u in users])
    placed = {k.decode(): p for k, _, p in read_topic(kafka_bootstrap, names.safe_pools)}
    assert placed == {u: key_partition(u.encode(), 8) for u in users}  # riskgate's placement is the producer's

    async def follow(shard):
        client = RankerClient(kafka_bootstrap, prefix=topic_prefix, shard=shard)
        await client.start()
        try:
            await client.wait_ready(60)
            return set(client.book.pools), len(client.book.thresholds), client.partitions, \
                {u: client.shard_of(u) for u in users}, {u for u in users if client.owns(u)}
        finally:
            await client.stop()

    whole, n_thresholds, parts, _, _ = asyncio.run(follow(None))
    assert whole == set(users) and n_thresholds == 1 and parts == tuple(range(8))
    shares = [asyncio.run(follow(Shard(i, 3))) for i in range(3)]
    assert [s[2] for s in shares] == [(0, 3, 6), (1, 4, 7), (2, 5)]
    for i, (held, n_thr, _, shard_of, owned) in enumerate(shares):
        assert n_thr == 1 and held == owned == {u for u in users if placed[u] % 3 == i}
        assert all(shard_of[u] == placed[u] % 3 for u in users)
    assert sorted(u for s in shares for u in s[0]) == sorted(users)  # disjoint and complete


def test_sharded_example_rankers_with_peers_serve_every_user_with_its_own_pool(kafka_bootstrap, topic_prefix):
    """Two shards behind any balancer: a request sent to the wrong one is answered with the user's pool all the same."""
    from streams.ranker import Shard
    from streams.topics import key_partition

    from ..net import bound_sockets, serving

    names = make_topics(kafka_bootstrap, topic_prefix, 4)
    cfg = EngineConfig(alphas=(0.1,))
    result = GroupResult("replace", "global", 500, (0.0, 1.0), (Threshold(0.1, 0.5, False, 0.08),))
    users = {}  # shard -> a user of it
    for i in range(100):
        users.setdefault(key_partition(f"v{i}".encode(), 4) % 2, f"v{i}")
    produce_raw(kafka_bootstrap, [(names.thresholds, b"replace:global", threshold_message(result, cfg, 3))] + [
        (names.safe_pools, u.encode(), safe_pool_message(u, [SafeItem(f"safe-of-{u}", 9.0)], ["guns"], band="low"))
        for u in users.values()])
    socks = bound_sockets(2)
    ports = [s.getsockname()[1] for s in socks]
    peers = [f"http://127.0.0.1:{p}" for p in ports]

    def request(user):
        return {"user_id": user, "k": 2, "alpha": 0.1, "strategy": "replace",
                "candidates": [{"item_id": "a", "score": 0.9, "rank_score": 3.0},
                               {"item_id": "g", "score": 0.1, "rank_score": 2.0, "tags": ["guns"]}]}

    async def run():
        apps = [make_app(kafka_bootstrap, prefix=topic_prefix, holdout_share=0.0, shard=Shard(i, 2), peers=peers)
                for i in range(2)]
        async with TestClient(TestServer(apps[0], port=ports[0], socket_factory=serving(socks[0]))) as s0, \
                TestClient(TestServer(apps[1], port=ports[1], socket_factory=serving(socks[1]))) as s1:
            for s in (s0, s1):
                deadline = asyncio.get_running_loop().time() + 60
                while (await s.get("/ready")).status != 200:
                    assert asyncio.get_running_loop().time() < deadline, "a shard never became ready"
                    await asyncio.sleep(0.2)
            out = []
            for s in (s0, s1):  # every user through every shard
                for shard, user in sorted(users.items()):
                    resp = await s.post("/rank", data=orjson.dumps(request(user)))
                    out.append((shard, user, resp.status, await resp.json()))
            pools = [(await (await s.get("/health")).json())["pools"] for s in (s0, s1)]
            return out, pools

    out, pools = asyncio.run(run())
    assert sorted(users) == [0, 1] and pools == [1, 1]  # each shard holds its own user's pool only
    for shard, user, status, body in out:
        assert status == 200, body
        # the user's blocked tag dropped "g", and the user's own safe item took its place
        assert [(i["item_id"], i["replacement"]) for i in body["items"]] == [("a", False), (f"safe-of-{user}", True)]


def test_ranker_refuses_an_alpha_riskgate_does_not_publish_once_it_knows_the_published_ones(kafka_bootstrap,
                                                                                           topic_prefix):
    """Before, an unpublished α resolved to no λ̂: 200 with every candidate silently filtered.

    With the strategy's ``global`` value held, such an α is a 400 naming it and the
    published ones; before riskgate's first publication it is still served fail-closed.
    """
    names = make_topics(kafka_bootstrap, topic_prefix, 2)
    cfg = EngineConfig(alphas=(0.05, 0.1, 0.2))
    result = GroupResult("replace", "global", 500, (0.0, 1.0), (
        Threshold(0.05, 0.7, False, 0.04), Threshold(0.1, 0.5, False, 0.08), Threshold(0.2, 0.3, False, 0.15)))

    def request(slate_id, alpha, strategy="replace"):
        return orjson.dumps({"user_id": "u1", "slate_id": slate_id, "k": 2, "alpha": alpha, "strategy": strategy,
                             "candidates": [{"item_id": "a", "score": 0.9, "rank_score": 3.0},
                                            {"item_id": "b", "score": 0.6, "rank_score": 2.0}]})

    async def run():
        loop = asyncio.get_running_loop()
        app = make_app(kafka_bootstrap, prefix=topic_prefix, holdout_share=0.0)
        async with TestClient(TestServer(app)) as client:
            deadline = loop.time() + 60
            while (await client.get("/ready")).status != 200:
                assert loop.time() < deadline, "the ranker never became ready"
                await asyncio.sleep(0.2)
            out = {}

            async def post(name, *args):
                resp = await client.post("/rank", data=request(name, *args))
                out[name] = resp.status, await resp.json()

            await post("before", 0.33)  # nothing published yet: fail closed
            await asyncio.to_thread(produce_raw, kafka_bootstrap,
                                    [(names.thresholds, b"replace:global", threshold_message(result, cfg, 4))])
            deadline = loop.time() + 30
            while True:  # until the ranker has read the threshold
                await post("published", 0.1)
                if out["published"][1]["lambda"] is not None:
                    break
                assert loop.time() < deadline, out["published"]
                await asyncio.sleep(0.2)
            await post("unpublished", 0.33)
            await post("near", 0.1 + 5e-13)  # ThresholdBook.resolve's equality: |Δα| < 1e-12
            await post("other-strategy", 0.33, "remove")  # no remove:global known: fail closed
            return out

    out = asyncio.run(run())
    status, body = out["before"]
    assert status == 200 and (body["group"], body["lambda"], body["items"]) == (None, None, []), body
    status, body = out["unpublished"]
    assert status == 400, body
    assert body["error"] == "alpha 0.33 is not published for strategy 'replace': riskgate publishes 0.05, 0.1, 0.2"
    assert body["alphas"] == [0.05, 0.1, 0.2]
    for name in ("published", "near"):
        status, body = out[name]
        assert status == 200 and (body["group"], body["lambda"], body["version"]) == ("global", 0.5, 4), body
        assert [i["item_id"] for i in body["items"]] == ["a", "b"]
    status, body = out["other-strategy"]
    assert status == 200 and (body["group"], body["lambda"], body["items"]) == (None, None, []), body

    def slates():
        seen = {(m := orjson.loads(v))["slate_id"]: m for _, v, _ in read_topic(kafka_bootstrap, names.inputs[0])}
        return seen if set(seen) >= {"before", "published", "near", "other-strategy"} else None

    impressions = wait_for(slates, 30, what="the impressions")
    assert "unpublished" not in impressions  # a refused request produces nothing
    # The near α is written as the published one: riskgate counts its realised risk under 0.1
    # (0.1 + 5e-13 was a series of its own, compared with no target).
    assert impressions["near"]["alpha"] == impressions["published"]["alpha"] == 0.1


BAD_SCORES = [  # (the second candidate, the reason the 400 gives)
    ({"item_id": "b", "score": "NaN"}, "candidates[1].score must be a finite number, not 'NaN'"),
    ({"item_id": "b", "score": "0.5"}, "candidates[1].score must be a finite number, not '0.5'"),
    ({"item_id": "b", "score": True}, "candidates[1].score must be a finite number, not True"),
    ({"item_id": "b", "score": None}, "candidates[1].score must be a finite number, not None"),
    ({"item_id": "b", "score": 0.5, "rank_score": "Infinity"},
     "candidates[1].rank_score must be a finite number, not 'Infinity'"),
    ({"item_id": "b", "score": 0.5, "rank_score": "-inf"},
     "candidates[1].rank_score must be a finite number, not '-inf'"),
]


def test_ranker_refuses_a_score_that_is_not_a_finite_number_naming_the_field_and_candidate(kafka_bootstrap,
                                                                                           topic_prefix):
    """Before, ``float()`` took "NaN" and "inf": a NaN score failed every ``score >= λ̂`` and was dropped unseen."""
    make_topics(kafka_bootstrap, topic_prefix, 1)

    def request(candidate):
        return orjson.dumps({"user_id": "u1", "slate_id": "s1", "k": 2, "alpha": 0.1, "strategy": "replace",
                             "candidates": [{"item_id": "a", "score": 0.9, "rank_score": 3.0}, candidate]})

    async def run():
        loop = asyncio.get_running_loop()
        async with TestClient(TestServer(make_app(kafka_bootstrap, prefix=topic_prefix, holdout_share=0.0))) as c:
            deadline = loop.time() + 60
            while (await c.get("/ready")).status != 200:  # (ready: a refusal is the body's, not a 503)
                assert loop.time() < deadline, "the ranker never became ready"
                await asyncio.sleep(0.2)
            out = []
            for candidate, _ in BAD_SCORES:
                resp = await c.post("/rank", data=request(candidate))
                out.append((resp.status, (await resp.json()).get("error")))
            return out

    assert asyncio.run(run()) == [(400, f"bad request: ValueError: {says}") for _, says in BAD_SCORES]


def test_a_score_must_be_a_finite_number_even_where_json_cannot_carry_one():
    from streams.example_ranker import _score

    assert _score(2, "s") == 2.0 and isinstance(_score(2, "s"), float)
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="s must be a finite number"):
            _score(bad, "s")
