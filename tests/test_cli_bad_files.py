"""``riskgate replay`` and ``riskgate produce`` on a bad input file: ``PATH:LINE: problem``, status 2, nothing done."""

import orjson
import pytest
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
    for bad, says in [(b"{nope", "bad JSON"), (b'{"topic": "watch"}', 'expected {"topic": str, "value": object}'),
                      (b'{"topic": "bogus", "value": {}}', "unknown topic 'bogus' (one of impressions, watch")]:
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
    # an address nothing listens on: the file is refused before any connection is tried
    for bad in (b"[1, 2]", b'{"topic": "bogus", "value": {}}'):  # (the second was sent to a topic "bogus")
        p = _events(tmp_path, bad)
        r = CliRunner().invoke(main, ["produce", "--broker", "kafka://127.0.0.1:1", "--events", str(p)])
        assert r.exit_code == 2
        assert f"riskgate produce: {p}:2: " in r.output and "(nothing produced)" in r.output


def test_a_gz_file_that_is_not_gzip_is_named_not_a_traceback(tmp_path):
    fake = tmp_path / "events.jsonl.gz"
    fake.write_bytes(b"plain text, not gzip\n")
    for command in (["replay", "--events", str(fake), "--out", str(tmp_path / "r"), "--no-progress"],
                    ["replay", "--kuairand", str(fake), "--out", str(tmp_path / "r"), "--no-progress"],
                    ["produce", "--broker", "kafka://127.0.0.1:1", "--events", str(fake)]):
        r = CliRunner().invoke(main, command)
        assert r.exit_code == 2, r.output
        assert f"{fake}:1: not a readable gzip file" in r.output and "Traceback" not in r.output


def test_a_replay_whose_report_folder_cannot_be_made_stops_before_replaying(tmp_path):
    (tmp_path / "a-file").write_text("")
    r = CliRunner().invoke(main, ["replay", "--synthetic", "--slates", "50", "--out", str(tmp_path / "a-file" / "r"),
                                  "--no-progress"])
    assert r.exit_code == 2 and "--out" in r.output and "cannot be created: Not a directory" in r.output


def test_a_replay_says_how_many_invalid_events_it_left_out(tmp_path):
    """They were counted only in figures.json: the command printed nothing of them and exited 0."""
    p = _events(tmp_path, b'{"topic": "flags", "value": {"event_id": "f1"}}')
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["replay", "--events", str(p), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert orjson.loads(r.stdout)["invalid_events"] == 1
    assert "1 invalid events were left out (schema: " in (out / "report.md").read_text()


def test_sizes_and_rates_that_cannot_work_are_usage_errors(tmp_path):
    for command in (["bench", "calibrate", "--slates", "0"], ["bench", "calibrate", "--items", "0"],
                    ["replay", "--synthetic", "--users", "0", "--out", str(tmp_path / "r")],
                    ["produce", "--broker", "kafka://127.0.0.1:1", "--rate", "-3"],
                    ["produce", "--broker", "kafka://127.0.0.1:1", "--slates", "-5"],
                    ["example-ranker", "--broker", "kafka://127.0.0.1:1", "--holdout-share", "2"],
                    ["demo", "--duration", "-5"], ["demo", "--rate", "0"]):
        r = CliRunner().invoke(main, command)
        assert r.exit_code == 2 and "Invalid value for" in r.output and "Traceback" not in r.output, command


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


def test_produce_says_when_its_events_are_too_short_in_event_time_to_calibrate_anything(tmp_path, monkeypatch):
    """A newcomer's ``produce --users 200 --slates 3000`` spans under an hour of event time: under the
    default label window nothing matures and every λ̂ stays filter_all, with nothing to say why."""
    from streams import producer

    async def fake_produce(bootstrap, events, **kw):
        return {"events": sum(1 for _ in events)}

    monkeypatch.setattr(producer, "produce_events", fake_produce)

    def run(span):
        p = tmp_path / "events.jsonl"
        p.write_bytes(b"".join(orjson.dumps({"topic": "watch", "value": {
            "event_id": f"w{i}", "user_id": "u1", "item_id": "i1", "watch_ms": 1.0, "duration_ms": 2.0,
            "ts": 1000.0 + span * i / 9}}) + b"\n" for i in range(10)))
        return CliRunner().invoke(main, ["produce", "--broker", "kafka://h:1", "--events", str(p)])

    short, long = run(600.0), run(7200.0)
    assert short.exit_code == long.exit_code == 0
    assert orjson.loads(short.stdout)["event_time_seconds"] == 600.0
    assert "these events span 600 s of event time" in short.stderr and "RISKGATE_LABEL_WINDOW (3,600 s" in short.stderr
    assert "note:" not in long.stderr


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


def test_the_demo_ignores_further_signals_once_one_has_started_its_cleanup():
    """A second SIGTERM, SIGHUP or Ctrl-C raised out of the demo's cleanup: one landing before the worker
    (in a session of its own) was signalled left it running."""
    import signal

    from streams import live

    saved = {sig: signal.getsignal(sig) for sig in live._SIGNALS}
    try:
        for sig in live._SIGNALS:
            signal.signal(sig, live._interrupt)
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            live._interrupt(signal.SIGTERM, None)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in live._SIGNALS)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
