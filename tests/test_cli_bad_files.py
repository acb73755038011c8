"""``riskgate replay`` and ``riskgate produce`` on a bad input file: ``PATH:LINE: problem``, status 2, nothing done."""

import orjson
from click.testing import CliRunner

from streams.cli import main


def _events(tmp_path, bad_line: bytes):
    p = tmp_path / "events.jsonl"
    good = orjson.dumps({"topic": "watch", "value": {"event_id": "w1", "user_id": "u1", "item_id": "i1",
                                                      "watch_ms": 1.0, "duration_ms": 2.0, "ts": 10.0}})
    p.write_bytes(good + b"\n" + bad_line + b"\n" + good + b"\n")
    return p


def test_replay_of_a_bad_event_file_names_the_line_and_writes_no_report(tmp_path):
    out = tmp_path / "report"
    for bad, says in [(b"{nope", "bad JSON"), (b'{"topic": "watch"}', 'expected {"topic": str, "value": object}')]:
        p = _events(tmp_path, bad)
        r = CliRunner().invoke(main, ["replay", "--events", str(p), "--out", str(out), "--no-progress"])
        assert r.exit_code == 2, r.output
        assert f"riskgate replay: {p}:2: " in r.output and says in r.output and "no report written" in r.output
        assert "Traceback" not in r.output and not out.exists()


def test_replay_of_a_bad_kuairand_file_names_the_line(tmp_path):
    p = tmp_path / "slice.tsv"
    p.write_text("user_id\tvideo_id\ttime_ms\tplay_time_ms\tduration_ms\tlabel\n"
                 "1\t2\t1649581149287\t5\t10\t1\n1\t3\tlater\t5\t10\t1\n")
    r = CliRunner().invoke(main, ["replay", "--kuairand", str(p), "--out", str(tmp_path / "r"), "--no-progress"])
    assert r.exit_code == 2 and f"riskgate replay: {p}:3: could not convert string to float: 'later'" in r.output


def test_produce_of_a_bad_event_file_produces_nothing(tmp_path):
    p = _events(tmp_path, b"[1, 2]")
    # an address nothing listens on: the file is refused before any connection is tried
    r = CliRunner().invoke(main, ["produce", "--broker", "kafka://127.0.0.1:1", "--events", str(p)])
    assert r.exit_code == 2
    assert f"riskgate produce: {p}:2: " in r.output and "(nothing produced)" in r.output


def _free_port() -> int:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_produce_dlq_replay_and_the_example_ranker_say_when_the_broker_cannot_be_reached(tmp_path):
    port = _free_port()
    for command in (["produce", "--slates", "5"], ["dlq-replay"], ["example-ranker", "--port", str(_free_port())]):
        r = CliRunner().invoke(main, [command[0], "--broker", f"kafka://127.0.0.1:{port}", *command[1:]])
        assert r.exit_code == 1, r.output
        assert f"riskgate {command[0]}: cannot reach the broker at 127.0.0.1:{port}" in r.output
        assert "Traceback" not in r.output


def test_produce_that_lost_its_broker_says_how_to_go_on_and_skip_leaves_out_what_is_there(tmp_path, monkeypatch):
    """The count printed is the ``--skip`` of the next run (tests/integration/test_produce_interrupted.py: real broker)."""
    from aiokafka.errors import KafkaTimeoutError

    from streams import producer

    p = tmp_path / "events.jsonl"
    p.write_bytes(b"".join(orjson.dumps({"topic": "watch", "value": {
        "event_id": f"w{i}", "user_id": "u1", "item_id": "i1", "watch_ms": 1.0, "duration_ms": 2.0, "ts": 10.0 + i}})
        + b"\n" for i in range(10)))
    runs = []

    async def fake_produce(bootstrap, events, **kw):
        events = [v["event_id"] for _, v in events]
        runs.append(events)
        if len(runs) == 1:
            raise producer.ProduceInterrupted(4, KafkaTimeoutError("batch expired"))
        return {"watch": len(events)}

    monkeypatch.setattr(producer, "produce_events", fake_produce)
    r1 = CliRunner().invoke(main, ["produce", "--broker", "kafka://h:1", "--events", str(p), "--skip", "3"])
    assert r1.exit_code == 1 and "Traceback" not in r1.output
    assert "riskgate produce: lost the broker at h:1 (KafkaTimeoutError: batch expired)" in r1.output
    assert "the first 7 events are on it" in r1.output and "--skip 7" in r1.output
    r2 = CliRunner().invoke(main, ["produce", "--broker", "kafka://h:1", "--events", str(p), "--skip", "7"])
    assert r2.exit_code == 0 and runs == [[f"w{i}" for i in range(3, 10)], ["w7", "w8", "w9"]]


def test_dlq_replay_that_lost_its_broker_says_where_to_go_on_from(monkeypatch):
    from aiokafka.errors import RequestTimedOutError

    from streams import dlq

    async def fake_replay(*a, **kw):
        raise dlq.ReplayInterrupted(42, {"watch schema": 3}, RequestTimedOutError())

    monkeypatch.setattr(dlq, "replay_dead_letters", fake_replay)
    r = CliRunner().invoke(main, ["dlq-replay", "--broker", "kafka://h:1"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "riskgate dlq-replay: lost the broker at h:1 ([Error 7] RequestTimedOutError)" in r.output
    assert "after replaying 3 dead letters; go on with the same command and --from-offset 42." in r.output
