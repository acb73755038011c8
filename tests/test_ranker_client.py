"""The ranker's side without Kafka: a value it cannot use is refused and the client keeps reading."""

import asyncio
from types import SimpleNamespace

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from calibration.engine import EngineConfig, GroupResult
from calibration.policy import Candidate
from calibration.safe_pool import SafeItem
from calibration.threshold import Threshold
from streams import example_ranker
from streams.ranker import RankerClient, ThresholdBook
from streams.topics import SAFE_POOLS, THRESHOLDS, safe_pool_message, threshold_basis, threshold_message

CFG = EngineConfig(alphas=(0.1,))
GOOD = GroupResult("replace", "global", 500, (0.0, 1.0), (Threshold(0.1, 0.5, False, 0.08),))
OWN = GroupResult("replace", "user:u1", 60, (0.0, 1.0), (Threshold(0.1, 0.7, False, 0.05),))


def _good_pool(item="safe-1"):
    return safe_pool_message("u1", [SafeItem(item, 9.0, ("cats",))], ["guns"], [OWN], version=2, band="high")


BAD_THRESHOLDS = [
    b"not json",
    b"[]",
    b'{"version": 9}',  # no thresholds
    b'{"version": "9", "thresholds": []}',
    b'{"version": 9, "thresholds": [{"alpha": 0.1}]}',  # no lambda
    b'{"version": 9, "thresholds": [{"alpha": "0.1", "lambda": 0.2}]}',
    b'{"version": 9, "thresholds": [{"alpha": 0.1, "lambda": "0.2"}]}',
]

BAD_POOLS = [
    b"\xff\xfe",
    b'"u1"',
    b'{"safe_pool": [{"item_id": "x"}]}',  # no rank score
    b'{"safe_pool": [{"item_id": "x", "rank_score": 1.0, "tags": "cats"}]}',
    b'{"blocked_tags": "guns"}',
    b'{"band": 1}',
    b'{"thresholds": {"replace": {"version": 3}}}',  # an own threshold without levels
]


@pytest.mark.parametrize("bad", BAD_THRESHOLDS)
def test_a_threshold_value_the_book_cannot_use_is_refused_and_the_last_good_one_stays(bad, caplog):
    book = ThresholdBook()
    assert book.on_threshold(b"replace:global", threshold_message(GOOD, CFG, 7))
    assert not book.on_threshold(b"replace:global", bad)
    assert book.resolve("u2", 0.1, "replace") == ("global", 0.5, 7)
    assert book.rejected == {THRESHOLDS: 1}
    assert "replace:global" in caplog.text and "refused" in caplog.text
    # with nothing good before it, the key stays unknown: the ranker fails closed
    empty = ThresholdBook()
    assert not empty.on_threshold(b"replace:global", bad)
    assert empty.resolve("u2", 0.1, "replace") == (None, None, None) and not empty.thresholds


@pytest.mark.parametrize("bad", BAD_POOLS)
def test_a_pool_value_the_book_cannot_use_is_refused_and_the_last_good_one_stays(bad):
    book = ThresholdBook()
    assert book.on_pool(b"u1", _good_pool())
    assert not book.on_pool(b"u1", bad)
    assert book.rejected == {SAFE_POOLS: 1}
    assert book.resolve("u1", 0.1, "replace") == ("user:u1", 0.7, 2)
    # the last good pool still serves: its blocked tag drops c2, its safe item replaces it
    d = book.apply("u1", [Candidate("c1", 0.95, 2.0), Candidate("c2", 0.99, 1.0, ("guns",))], 2, 0.1, "replace")
    assert [(s.item_id, s.replacement) for s in d.slate] == [("c1", False), ("safe-1", True)]


@pytest.mark.parametrize("key", [None, b"\xff\xfe"])
def test_a_record_whose_key_is_not_text_is_refused(key):
    book = ThresholdBook()
    assert not book.on_threshold(key, threshold_message(GOOD, CFG, 7))
    assert not book.on_pool(key, _good_pool()) and not book.on_pool(key, None)
    assert book.rejected == {THRESHOLDS: 1, SAFE_POOLS: 2} and not book.thresholds and not book.pools


def test_every_value_riskgate_writes_is_taken():
    book = ThresholdBook()
    filter_all = GroupResult("remove", "band:high", 300, None, (Threshold(0.1, None, True, None),))
    assert book.on_threshold("remove:band:high", threshold_message(filter_all, CFG, 1))
    assert book.on_threshold("replace:global", threshold_message(GOOD, CFG, 4, inputs_through=12.5))
    assert book.on_pool("u1", _good_pool())
    assert book.on_pool("u2", safe_pool_message("u2", [], []))
    assert book.on_threshold("replace:global", None) and book.on_pool("u2", None)  # tombstones
    assert not book.rejected and set(book.thresholds) == {"remove:band:high"} and set(book.pools) == {"u1"}
    assert book.resolve("u1", 0.1, "remove") == ("band:high", None, 1)  # filter_all: λ̂ None


def test_a_group_short_of_min_slates_falls_back_to_the_next_one_and_global_is_used_whatever_its_n():
    """SPEC §5: a group has a λ̂ of its own only with ``min_slates`` slates; below, consumers fall back.

    The book used a band's value whatever its ``n``: a band with no slate yet
    (published as filter_all) filtered its users' every item while ``global``
    had a λ̂ from thousands of slates.
    """
    def result(group, n, lam):
        return GroupResult("remove", group, n, None, (Threshold(0.1, lam, lam is None, None),))

    cfg = EngineConfig(alphas=(0.1,), min_slates=100)
    book = ThresholdBook()
    book.on_pool("u1", safe_pool_message("u1", [], [], band="high"))
    book.on_threshold("remove:global", threshold_message(result("global", 5000, 0.4), cfg, 3))
    book.on_threshold("remove:band:high", threshold_message(result("band:high", 0, None), cfg, 1))
    assert book.resolve("u1", 0.1, "remove") == ("global", 0.4, 3)
    book.on_threshold("remove:band:high", threshold_message(result("band:high", 99, 0.9), cfg, 2))
    assert book.resolve("u1", 0.1, "remove") == ("global", 0.4, 3)
    book.on_threshold("remove:band:high", threshold_message(result("band:high", 100, 0.6), cfg, 3))
    assert book.resolve("u1", 0.1, "remove") == ("band:high", 0.6, 3)
    # global is the last resort: used short of min_slates too (its λ̂ is then conservative)
    book.on_threshold("remove:global", threshold_message(result("global", 7, None), cfg, 4))
    assert book.resolve("u2", 0.1, "remove") == ("global", None, 4)
    # the user's own λ̂ comes only with min_slates of its own, and is used first
    own = GroupResult("remove", "user:u1", 100, (0.0, 1.0), (Threshold(0.1, 0.2, False, 0.05),))
    book.on_pool("u1", safe_pool_message("u1", [], [], [own], version=5, band="high", basis=threshold_basis(cfg)))
    assert book.resolve("u1", 0.1, "remove") == ("user:u1", 0.2, 5)
    # a value that does not say min_slates (written before riskgate did) is taken as before
    old = {"version": 9, "n": 3, "thresholds": [{"alpha": 0.1, "lambda": 0.8, "filter_all": False}]}
    book.on_threshold("remove:band:low", orjson.dumps(old))
    assert book.resolve("u3", 0.1, "remove") == ("band:low", 0.8, 9)


def test_every_published_lambda_names_its_loss_guarantee_and_min_slates():
    """SPEC §4: every output names the loss it was computed with, a user's own λ̂ in safe-pools too."""
    cfg = EngineConfig(alphas=(0.1,), loss="per_slot", guarantee="high_probability", delta=0.05, min_slates=50)
    want = {"loss": "per_slot", "guarantee": "high_probability", "delta": 0.05, "min_slates": 50}
    shared = orjson.loads(threshold_message(GOOD, cfg, 1))
    own = orjson.loads(safe_pool_message("u1", [], [], [OWN], basis=threshold_basis(cfg)))["thresholds"]["replace"]
    for value in (shared, own):
        assert {k: value[k] for k in want} == want


class _Consumer:
    """What :class:`RankerClient` uses of an aiokafka consumer, over given records; ``fail`` is raised after them.

    ``pools`` is how many partitions ``safe-pools`` has (``risk-thresholds`` has one);
    a record's partition is its ``partition`` (0 if unset). Each fetch hands out at
    most ``per_fetch`` records, so that catching up takes several.
    """

    def __init__(self, records, fail: Exception | None = None, pools: int = 1, per_fetch: int = 1000):
        self.records, self.fail, self.pools, self.per_fetch = records, fail, pools, per_fetch
        self._client = SimpleNamespace(force_metadata_update=self._metadata)
        self.assigned: list = []
        self.position_of: dict = {}
        self.seen_metadata = False

    async def _metadata(self):
        self.seen_metadata = True

    def partitions_for_topic(self, topic):
        return set(range(self.pools)) if topic == SAFE_POOLS else {0}

    def assign(self, tps):
        self.assigned = list(tps)

    async def seek_to_beginning(self, *tps):
        self.position_of = {tp: 0 for tp in tps}

    def _log(self, tp):
        return [r for r in self.records if (r.topic, getattr(r, "partition", 0)) == (tp.topic, tp.partition)]

    def highwater(self, tp):
        return len(self._log(tp))

    async def position(self, tp):
        return self.position_of[tp]

    async def getmany(self, timeout_ms=0):
        out, room = {}, self.per_fetch
        for tp in self.assigned:
            at = self.position_of[tp]
            log = self._log(tp)[at:][:room]
            if log:
                out[tp] = [SimpleNamespace(**vars(r), offset=at + i) for i, r in enumerate(log)]
                self.position_of[tp] += len(log)
                room -= len(log)
        if out:
            return out
        if self.fail is not None:
            raise self.fail
        await asyncio.sleep(timeout_ms / 1000)  # a live topic: nothing more for now
        return {}

    async def stop(self):
        pass


def _rec(topic, key, value, partition=0):
    return SimpleNamespace(topic=topic, key=key, value=value, partition=partition)


def _follow(consumer):
    """Run the client's read loop over ``consumer`` until it has taken every record; returns the client."""

    async def run():
        client = RankerClient("unused:1", keep_updates=True)
        client._consumer = consumer
        client._task = asyncio.create_task(client._run())
        for _ in consumer.records:
            await asyncio.wait_for(client.updates.get(), 5)
        await asyncio.sleep(0)  # (the loop reaches its end, or waits for more)
        healthy = client.healthy
        await client.stop()
        return client, healthy

    return asyncio.run(run())


def test_the_client_goes_on_reading_after_a_value_it_refused():
    records = [_rec(THRESHOLDS, b"replace:global", b"{oops"),
               _rec(SAFE_POOLS, b"u1", b'{"safe_pool": 3}'),
               _rec(SAFE_POOLS, b"\xc3", _good_pool("bad-key")),
               _rec(THRESHOLDS, b"replace:global", threshold_message(GOOD, CFG, 5)),
               _rec(SAFE_POOLS, b"u1", _good_pool("after"))]
    client, healthy = _follow(_Consumer(records))
    assert healthy and client.error is None
    assert client.book.rejected == {THRESHOLDS: 1, SAFE_POOLS: 2}
    assert client.book.resolve("u2", 0.1, "replace") == ("global", 0.5, 5)
    assert [p["item_id"] for p in client.book.pools["u1"]["safe_pool"]] == ["after"]


def test_a_client_whose_consumer_failed_says_so(caplog):
    from aiokafka.errors import KafkaError

    records = [_rec(THRESHOLDS, b"replace:global", threshold_message(GOOD, CFG, 5))]
    client, healthy = _follow(_Consumer(records, fail=KafkaError("broker gone")))
    assert not healthy and isinstance(client.error, KafkaError)
    assert "stopped reading" in caplog.text
    assert client.book.resolve("u2", 0.1, "replace") == ("global", 0.5, 5)  # what it had stays


def test_a_client_keeps_no_queue_of_updates_unless_asked():
    """A ranker that never drains ``updates`` must not hold every record it read (it grew without bound)."""
    records = [_rec(SAFE_POOLS, f"u{i}".encode(), _good_pool()) for i in range(50)]

    async def run(keep):
        client = RankerClient("unused:1", keep_updates=keep)
        client._consumer = _Consumer(records)
        client._task = asyncio.create_task(client._run())
        while len(client.book.pools) < len(records):
            await asyncio.sleep(0)
        await client.stop()
        return client

    quiet, kept = asyncio.run(run(False)), asyncio.run(run(True))
    assert quiet.updates is None and len(quiet.book.pools) == 50
    assert kept.updates.qsize() == 50


class _FakeClient:
    """What the example ranker uses of :class:`RankerClient`, with no broker."""

    made: list = []

    def __init__(self, *a, **k):
        self.book, self.error, self.healthy, self.ready = ThresholdBook(), None, True, True
        self.shard, self.partitions = k.get("shard"), (0,)
        self.made.append(self)

    def owns(self, user_id):
        return True

    def lag(self):
        return {THRESHOLDS: 0, SAFE_POOLS: 7}

    async def start(self):
        pass

    async def stop(self):
        pass


class _FakeProducer(_FakeClient):
    made: list = []

    def __init__(self, *a, **k):
        super().__init__()
        self.sent, self.fail_next = [], None

    async def send(self, topic, value, key=None):
        """Like aiokafka's: a future of the broker's acknowledgement (``fail_next``: its error instead)."""
        self.sent.append((topic, key, value))
        acked = asyncio.get_running_loop().create_future()
        if self.fail_next is not None:
            acked.set_exception(self.fail_next)
            self.fail_next = None
        else:
            acked.set_result(None)
        return acked


def _no_broker(monkeypatch):
    """The example ranker's client and producer replaced by fakes (instances in their ``made``)."""
    import aiokafka

    monkeypatch.setattr(_FakeClient, "made", [])
    monkeypatch.setattr(_FakeProducer, "made", [])
    monkeypatch.setattr(example_ranker, "RankerClient", _FakeClient)
    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", _FakeProducer)


def _rank(monkeypatch, *bodies, holdout_share=0.0):
    """POST each body to a fresh example ranker with no broker; returns [(status, json)] and what it produced."""
    _no_broker(monkeypatch)

    async def run():
        out = []
        async with TestClient(TestServer(example_ranker.make_app("unused:1", holdout_share=holdout_share))) as http:
            _FakeClient.made[0].book.on_threshold("replace:global", threshold_message(GOOD, CFG, 3))
            for b in bodies:
                resp = await http.post("/rank", data=b if isinstance(b, bytes) else orjson.dumps(b))
                out.append((resp.status, await resp.json()))
        return out, _FakeProducer.made[0].sent

    return asyncio.run(run())


_OK = {"user_id": "u1", "slate_id": "s1", "k": 2, "alpha": 0.1,
       "candidates": [{"item_id": "a", "score": 0.9, "tags": ["cats"]}, {"item_id": "b", "score": 0.7}]}


@pytest.mark.parametrize("change, says", [
    ({"strategy": "rerank"}, "strategy must be one of remove, replace"),
    ({"k": 0}, "k must be at least 1"),
    ({"alpha": 1.5}, "alpha must be in (0, 1)"),
    ({"candidates": [{"item_id": "a", "score": 0.9, "tags": "guns"}]}, "candidates[0].tags must be a list"),
    ({"candidates": [{"item_id": "a"}]}, "KeyError"),
    ({"candidates": [{"item_id": "a", "score": 0.9}, {"item_id": "a", "score": 0.8}]},
     "riskgate would refuse this slate's impression: schema: event: an item appears twice in the slate"),
    ({"user_id": ""}, "riskgate would refuse this slate's impression: schema: user_id"),
    ({"user_id": None}, "user_id must be a string"),
    ({"candidates": {"item_id": "a"}}, "candidates must be a list"),
    ({"candidates": ["a"]}, "candidates[0] must be an object"),
    ({"candidates": [{"item_id": [1], "score": 0.5}]}, "candidates[0].item_id must be a string"),
])
@pytest.mark.parametrize("holdout_share", [0.0, 1.0])
def test_the_example_ranker_refuses_a_bad_request_with_the_reason_and_produces_nothing(monkeypatch, change, says,
                                                                                      holdout_share):
    (res, ok), sent = _rank(monkeypatch, {**_OK, **change}, _OK, holdout_share=holdout_share)
    assert res[0] == 400 and says in res[1]["error"], res
    assert ok[0] == 200 and [i["item_id"] for i in ok[1]["items"]] == ["a", "b"]
    assert len(sent) == 1 and orjson.loads(sent[0][2])["slate_id"] == "s1"  # the good one only


def test_the_example_ranker_answers_400_to_a_body_that_is_not_a_json_object(monkeypatch):
    [(s1, b1), (s2, b2)], sent = _rank(monkeypatch, b"{nope", b"[1, 2]")
    assert s1 == 400 and b1["error"].startswith("bad request: JSONDecodeError") and not sent
    assert s2 == 400 and b2["error"] == "bad request: ValueError: the body must be a JSON object"


def test_the_example_ranker_takes_numeric_ids_as_their_digits(monkeypatch):
    body = {**_OK, "user_id": 7, "candidates": [{"item_id": 11, "score": 0.9}]}
    [(status, out)], sent = _rank(monkeypatch, body)
    assert status == 200 and [i["item_id"] for i in out["items"]] == ["11"]
    assert sent[0][1] == b"7" and orjson.loads(sent[0][2])["user_id"] == "7"


def test_the_example_ranker_health_is_503_once_its_client_stopped_following(monkeypatch):
    _no_broker(monkeypatch)

    async def run():
        async with TestClient(TestServer(example_ranker.make_app("unused:1"))) as http:
            first = await http.get("/health")
            body1 = await first.json()
            (client,) = _FakeClient.made
            client.book.rejected[THRESHOLDS] += 2
            client.healthy, client.error = False, RuntimeError("broker gone")
            second = await http.get("/health")
            return first.status, body1, second.status, await second.json()

    s1, b1, s2, b2 = asyncio.run(run())
    assert s1 == 200 and b1["following"] is True and b1["rejected"] == {} and b1["error"] is None
    assert s2 == 503 and b2["following"] is False
    assert b2["error"] == "RuntimeError: broker gone" and b2["rejected"] == {THRESHOLDS: 2}


# -- ready: serve only once caught up ----------------------------------------------------------------------------
def _started(consumer, **kwargs) -> RankerClient:
    client = RankerClient("unused:1", **kwargs)
    client._consumer = consumer
    client._task = asyncio.create_task(client._run())
    return client


def _pools(n, partitions=1):
    from streams.topics import key_partition

    return [_rec(SAFE_POOLS, f"u{i}".encode(), _good_pool(), key_partition(f"u{i}".encode(), partitions))
            for i in range(n)]


def test_the_client_is_ready_only_once_it_holds_everything_written_before_it_started():
    """Before, a ranker served from its first moment, with users' pools (bands, blocked tags) still unread."""
    records = [_rec(THRESHOLDS, b"replace:global", threshold_message(GOOD, CFG, 5))] + _pools(100)

    async def run():
        client = _started(_Consumer(records, per_fetch=10))
        seen = []
        while not client.ready:
            seen.append(len(client.book.pools))
            await asyncio.sleep(0)
        held = len(client.book.pools)
        await client.wait_ready(5)
        await client.stop()
        return seen, held, client

    seen, held, client = asyncio.run(run())
    assert held == 100 and len(client.book.thresholds) == 1
    assert client.lag() == {THRESHOLDS: 0, SAFE_POOLS: 0}
    assert seen[0] == 0 and len(set(seen)) > 5  # not ready while the book was filling, fetch by fetch


class _LiveConsumer(_Consumer):
    """A topic written faster than one fetch reads it: its end keeps moving away."""

    async def getmany(self, timeout_ms=0):
        n = len(self.records)
        self.records = self.records + [_rec(SAFE_POOLS, f"new{n + i}".encode(), _good_pool()) for i in range(20)]
        return await super().getmany(timeout_ms)


def test_a_client_on_a_busy_topic_is_ready_once_it_reached_where_the_topic_ended_when_it_started():
    async def run():
        client = _started(_LiveConsumer(_pools(100), per_fetch=10))
        await client.wait_ready(5)
        held = {k for k in client.book.pools if not k.startswith("new")}
        await client.stop()
        return held

    assert len(asyncio.run(run())) == 100


def test_a_client_of_empty_topics_is_ready_at_once():
    async def run():
        client = _started(_Consumer([]))
        await client.wait_ready(5)
        ok = client.ready
        await client.stop()
        return ok

    assert asyncio.run(run())


class _LateTopics(_Consumer):
    """Topics that exist only from the third metadata request on."""

    asked = 0

    def partitions_for_topic(self, topic):
        return super().partitions_for_topic(topic) if self.asked > 2 else None

    async def _metadata(self):
        self.asked += 1


def test_a_client_started_before_the_topics_exist_waits_for_them_not_ready(monkeypatch, caplog):
    monkeypatch.setattr(RankerClient, "TOPIC_RETRY_S", 0.01)

    async def run():
        consumer = _LateTopics(_pools(3))
        client = _started(consumer)
        while consumer.asked < 2:
            await asyncio.sleep(0.005)
        early = client.ready, client.healthy, client.shard_of("u1")
        await client.wait_ready(5)
        await client.stop()
        return early, client

    (ready, healthy, shard), client = asyncio.run(run())
    assert (ready, healthy, shard) == (False, True, None)
    assert len(client.book.pools) == 3 and "waiting for risk-thresholds and safe-pools to exist" in caplog.text


def test_wait_ready_raises_the_error_of_a_client_that_failed_first():
    from aiokafka.errors import KafkaError

    async def run():
        client = _started(_Consumer([], fail=KafkaError("broker gone")))
        with pytest.raises(KafkaError):
            await client.wait_ready(5)
        return client.ready

    assert asyncio.run(run()) is False


# -- shards: a replica holds its share of the users' pools ------------------------------------------------------
def test_shard_parses_i_of_n_and_refuses_anything_else():
    from streams.ranker import Shard

    assert Shard.parse("2/3") == Shard(2, 3) and str(Shard(2, 3)) == "2/3"
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0", ""):
        with pytest.raises(ValueError, match="I/N"):
            Shard.parse(bad)


def test_sharded_clients_hold_disjoint_shares_that_together_are_the_whole_book():
    from streams.ranker import Shard
    from streams.topics import key_partition

    records = [_rec(THRESHOLDS, b"replace:global", threshold_message(GOOD, CFG, 5))] + _pools(300, partitions=8)

    async def run(shard):
        client = _started(_Consumer(records, pools=8), shard=shard)
        await client.wait_ready(5)
        await client.stop()
        return client

    whole = asyncio.run(run(None))
    shards = [asyncio.run(run(Shard(i, 3))) for i in range(3)]
    assert len(whole.book.pools) == 300 and whole.partitions == tuple(range(8))
    assert [c.partitions for c in shards] == [(0, 3, 6), (1, 4, 7), (2, 5)]
    held = [set(c.book.pools) for c in shards]
    assert set().union(*held) == set(whole.book.pools) and sum(map(len, held)) == 300  # disjoint, complete
    for i, c in enumerate(shards):
        assert len(c.book.thresholds) == 1  # every replica holds every group's threshold
        assert all(c.owns(u) and whole.shard_of(u) == 0 and c.shard_of(u) == i for u in c.book.pools)
        assert all(key_partition(u.encode(), 8) % 3 == i for u in c.book.pools)
        assert not any(c.owns(u) for other in held if other is not held[i] for u in other)


def test_a_shard_past_the_partition_count_fails_the_client_with_the_reason():
    from streams.ranker import Shard

    async def run():
        client = _started(_Consumer([], pools=2), shard=Shard(2, 3))
        with pytest.raises(ValueError, match="shard 2/3 follows no partition: safe-pools has 2"):
            await client.wait_ready(5)
        return client.healthy

    assert asyncio.run(run()) is False


def test_the_example_ranker_refuses_to_serve_until_ready_and_sends_other_shards_users_away(monkeypatch):
    _no_broker(monkeypatch)
    from streams.ranker import Shard

    async def run():
        out = []
        app = example_ranker.make_app("unused:1", holdout_share=0.0, shard=Shard(1, 2))
        async with TestClient(TestServer(app)) as http:
            (client,) = _FakeClient.made
            client.book.on_threshold("replace:global", threshold_message(GOOD, CFG, 3))
            client.ready = False
            for path in ("/ready", "/health"):
                resp = await http.get(path)
                out.append((resp.status, await resp.json()))
            resp = await http.post("/rank", data=orjson.dumps(_OK))
            out.append((resp.status, await resp.json()))
            client.ready = True
            client.owns = lambda u: u != "u1"
            client.shard_of = lambda u: 0
            resp = await http.post("/rank", data=orjson.dumps(_OK))
            out.append((resp.status, await resp.json()))
            resp = await http.post("/rank", data=orjson.dumps({**_OK, "user_id": "u2"}))
            out.append((resp.status, await resp.json()))
            resp = await http.get("/ready")
            out.append((resp.status, await resp.json()))
        return out, _FakeProducer.made[0].sent

    [(r1, b1), (h1, hb1), (rank1, rb1), (rank2, rb2), (rank3, rb3), (r2, b2)], sent = asyncio.run(run())
    assert r1 == 503 and b1["ready"] is False and b1["shard"] == "1/2"
    assert h1 == 200 and hb1["following"] is True  # alive, not ready: no restart
    assert rank1 == 503 and "not ready" in rb1["error"]
    assert rank2 == 421 and rb2["shard"] == 0 and "belongs to shard 0, this is shard 1/2" in rb2["error"]
    assert rank3 == 200 and rb3["lambda"] == 0.5
    assert r2 == 200 and b2["ready"] is True
    assert [orjson.loads(v)["user_id"] for _, _, v in sent] == ["u2"]  # only the served slate was produced


@pytest.mark.parametrize("shard", ["3/2", "one/two"])
def test_the_example_ranker_command_refuses_a_bad_shard_before_connecting(shard):
    from click.testing import CliRunner

    from streams.cli import main

    res = CliRunner().invoke(main, ["example-ranker", "--broker", "kafka://127.0.0.1:1", "--shard", shard])
    assert res.exit_code == 2 and "Invalid value for '--shard'" in res.output and "I/N" in res.output


def test_the_example_ranker_exports_what_its_client_holds_and_whether_it_follows(monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    _no_broker(monkeypatch)

    async def run():
        async with TestClient(TestServer(example_ranker.make_app("unused:1"))) as http:
            (client,) = _FakeClient.made
            book = client.book
            book.on_threshold("replace:global", threshold_message(GOOD, CFG, 3))
            book.on_threshold("replace:user:u1", threshold_message(OWN, CFG, 9))  # per user: not kept
            book.on_pool("u1", _good_pool())
            book.on_pool("u2", b"{nope")
            client.ready = False
            resp = await http.get("/metrics")
            return resp.status, await resp.text()

    status, text = asyncio.run(run())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert status == 200
    assert samples[("riskgate_ranker_following", ())] == 1 and samples[("riskgate_ranker_ready", ())] == 0
    assert samples[("riskgate_ranker_pools", ())] == 1 and samples[("riskgate_ranker_thresholds", ())] == 1
    assert samples[("riskgate_ranker_rejected_total", (("topic", SAFE_POOLS),))] == 1
    assert samples[("riskgate_ranker_lag_records", (("topic", SAFE_POOLS),))] == 7
    versions = {k: v for k, v in samples.items() if k[0] == "riskgate_ranker_threshold_version"}
    assert versions == {("riskgate_ranker_threshold_version", (("group", "global"), ("strategy", "replace"))): 3}
    assert samples[("riskgate_ranker_process_resident_memory_bytes", ())] > 0


def test_a_users_own_threshold_on_risk_thresholds_is_not_kept_the_one_in_the_pool_serves():
    """Every replica would hold every such user's copy, which resolve never reads."""
    book = ThresholdBook()
    assert book.on_threshold(b"replace:user:u1", threshold_message(OWN, CFG, 9))
    assert book.on_threshold(b"replace:user:u1", b"{not even json")  # (not read, so not refused either)
    assert book.on_threshold(b"replace:user:u1", None)
    assert not book.thresholds and not book.rejected
    assert book.on_pool(b"u1", _good_pool()) and book.resolve("u1", 0.1, "replace") == ("user:u1", 0.7, 2)


def test_the_example_ranker_counts_and_logs_impressions_the_broker_did_not_take(monkeypatch, caplog):
    """A ranker that stops reporting slates starves the calibration window while thresholds still arrive on time."""
    from aiokafka.errors import KafkaTimeoutError
    from prometheus_client.parser import text_string_to_metric_families

    _no_broker(monkeypatch)

    async def run():
        async with TestClient(TestServer(example_ranker.make_app("unused:1", holdout_share=0.0))) as http:
            producer = _FakeProducer.made[0]
            statuses = [(await http.post("/rank", data=orjson.dumps(_OK))).status]
            producer.fail_next = KafkaTimeoutError("batch expired")
            statuses.append((await http.post("/rank", data=orjson.dumps({**_OK, "slate_id": "s2"}))).status)
            statuses.append((await http.post("/rank", data=orjson.dumps({**_OK, "slate_id": "s3"}))).status)
            await asyncio.sleep(0)  # (the acknowledgements' callbacks)
            return statuses, await (await http.get("/metrics")).text()

    statuses, text = asyncio.run(run())
    counts = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "riskgate_ranker_impressions_total"}
    assert statuses == [200, 200, 200] and counts == {"sent": 2, "failed": 1}
    assert "an impression could not be produced (KafkaTimeoutError: batch expired)" in caplog.text


def test_the_clients_lag_is_what_the_topics_hold_beyond_what_its_book_took():
    records = _pools(50)

    async def run():
        consumer = _Consumer(records, per_fetch=20)
        client = RankerClient("unused:1")
        client._consumer = consumer
        await client._assign()  # (as _run does first; no record taken yet)
        client._next = {tp: 0 for tp in consumer.assigned}
        before = client.lag()
        client._task = asyncio.create_task(client._run())
        await client.wait_ready(5)
        after = client.lag()
        await client.stop()
        return before, after

    before, after = asyncio.run(run())
    assert before == {THRESHOLDS: 0, SAFE_POOLS: 50} and after == {THRESHOLDS: 0, SAFE_POOLS: 0}


def test_a_shard_forwards_a_request_for_another_shards_user_once_and_says_when_that_shard_is_down(monkeypatch):
    """With --peers any load balancer can spread requests over the shards: a misrouted one takes one more hop."""
    from streams.ranker import Shard

    from .net import bound_sockets, serving

    _no_broker(monkeypatch)
    socks = bound_sockets(2)
    ports = [s.getsockname()[1] for s in socks]
    peers = [f"http://127.0.0.1:{p}" for p in ports]
    owner = {"u0": 0, "u1": 1}

    async def run():
        apps = [example_ranker.make_app("unused:1", holdout_share=0.0, shard=Shard(i, 2), peers=peers)
                for i in range(2)]
        out = {}
        servers = [TestServer(app, port=port, socket_factory=serving(sock))
                   for app, port, sock in zip(apps, ports, socks)]
        async with TestClient(servers[0]) as http0, TestClient(servers[1]) as http1:
            for i, client in enumerate(_FakeClient.made):
                client.book.on_threshold("replace:global", threshold_message(GOOD, CFG, 3))
                client.owns = lambda u, i=i: owner[u] == i
                client.shard_of = lambda u: owner[u]
            resp = await http0.post("/rank", data=orjson.dumps({**_OK, "user_id": "u1", "slate_id": "f1"}))
            out["forwarded"] = resp.status, await resp.json()
            resp = await http0.post("/rank", data=orjson.dumps({**_OK, "user_id": "u0", "slate_id": "own"}))
            out["own"] = resp.status, await resp.json()
            # two shards that disagree about a user: the forwarded request is answered, not sent back
            _FakeClient.made[1].owns = lambda u: False
            _FakeClient.made[1].shard_of = lambda u: 0
            resp = await http0.post("/rank", data=orjson.dumps({**_OK, "user_id": "u1", "slate_id": "loop"}))
            out["disagree"] = resp.status, await resp.json()
            await servers[1].close()  # shard 1 is down
            resp = await http0.post("/rank", data=orjson.dumps({**_OK, "user_id": "u1", "slate_id": "down"}))
            out["down"] = resp.status, await resp.json()
        sent = [[orjson.loads(v)["slate_id"] for _, _, v in p.sent] for p in _FakeProducer.made]
        return out, sent

    out, sent = asyncio.run(run())
    status, body = out["forwarded"]
    assert status == 200 and body["slate_id"] == "f1" and body["lambda"] == 0.5
    assert out["own"][0] == 200
    assert sent == [["own"], ["f1"]]  # each slate reported once, by the shard that holds its user
    status, body = out["disagree"]
    assert status == 421 and body["shard"] == 0
    status, body = out["down"]
    assert status == 502 and body["shard"] == 1 and body["error"].startswith(f"shard 1 at {peers[1]} did not answer")


def test_peers_need_a_shard_and_one_url_per_shard():
    from streams.ranker import Shard

    with pytest.raises(ValueError, match="they need a shard"):
        example_ranker.make_app("unused:1", peers=["http://a"])
    with pytest.raises(ValueError, match="in shard order: 3, not 2"):
        example_ranker.make_app("unused:1", shard=Shard(0, 3), peers=["http://a", "http://b"])


@pytest.mark.parametrize("args, says", [(["--peers", "http://a,http://b"], "needs --shard I/N"),
                                        (["--shard", "0/2", "--peers", "http://a"], "in shard order: 2, not 1")])
def test_the_example_ranker_command_refuses_peers_that_do_not_match_its_shards(args, says):
    from click.testing import CliRunner

    from streams.cli import main

    res = CliRunner().invoke(main, ["example-ranker", "--broker", "kafka://127.0.0.1:1", *args])
    assert res.exit_code == 2 and "Invalid value for --peers" in res.output and says in res.output
