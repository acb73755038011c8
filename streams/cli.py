"""The ``riskgate`` command line.

Sub-commands import what they need lazily, so ``riskgate calibrate`` does not
pay for importing Faust.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import click
import orjson

from calibration.risk import LOSSES, STRATEGIES
from calibration.threshold import GUARANTEES

__all__ = ["main"]


def _alpha(ctx, param, values):
    for a in values:
        if not 0.0 < a < 1.0:
            raise click.BadParameter(f"{a} is not in (0, 1)")
    return values


def _kafka_kwargs() -> dict:
    """SASL/TLS options from the RISKGATE_SECURITY_PROTOCOL, RISKGATE_SASL_*, RISKGATE_SSL_* settings."""
    from .settings import SettingsError, load_settings

    try:
        return load_settings().kafka_kwargs()
    except SettingsError as e:
        raise click.UsageError(f"bad configuration: {e}") from None


def _dump(obj) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    sys.stdout.flush()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """riskgate: conformal risk control for recommender slates, offline and on Kafka."""


@main.command()
@click.option("--slates", "slates_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL, one mature holdout slate per line.")
@click.option("--alpha", "alphas", multiple=True, required=True, type=float, callback=_alpha,
              help="Target risk level; repeat for several.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="replace", show_default=True)
@click.option("--guarantee", type=click.Choice(GUARANTEES), default="expectation", show_default=True)
@click.option("--delta", type=float, default=0.1, show_default=True,
              help="Failure probability for --guarantee high_probability.")
@click.option("--loss", type=click.Choice(LOSSES), default="fraction", show_default=True)
@click.option("--grid-min", type=float, default=0.0, show_default=True)
@click.option("--grid-max", type=float, default=1.0, show_default=True)
@click.option("--grid-size", type=int, default=1001, show_default=True)
@click.option("--grid-values", default=None, metavar="V1,V2,...",
              help="An explicit grid, comma-separated (+inf is appended); replaces --grid-min/max/size "
                   "(as RISKGATE_GRID_VALUES does for the worker).")
def calibrate(slates_path, alphas, strategy, guarantee, delta, loss, grid_min, grid_max, grid_size,
              grid_values) -> None:
    """λ̂ for each --alpha from a file of mature slates (JSON on stdout)."""
    from calibration.grid import make_grid
    from calibration.threshold import thresholds
    from calibration.window import CurveAccumulator

    from .slate_file import SlateFileError, read_slates

    if guarantee == "high_probability" and not 0.0 < delta < 1.0:
        raise click.BadParameter(f"{delta} is not in (0, 1)", param_hint="--delta")
    if grid_values is not None:
        try:
            grid = make_grid(values=[float(v) for v in grid_values.split(",")])
        except ValueError as e:
            raise click.BadParameter(f"{grid_values!r}: {e}", param_hint="--grid-values") from None
    else:
        try:
            grid = make_grid(grid_min, grid_max, grid_size)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--grid-min/--grid-max/--grid-size") from None
    try:
        batch = read_slates(slates_path)
    except SlateFileError as e:
        click.echo(f"riskgate calibrate: {e}", err=True)
        sys.exit(2)
    acc = CurveAccumulator(len(grid)).add(batch, grid, strategy, loss)
    result = thresholds(acc.sums(), acc.n, grid, alphas, guarantee, delta if guarantee == "high_probability" else None)
    _dump(
        {
            "strategy": strategy,
            "guarantee": guarantee,
            "delta": delta if guarantee == "high_probability" else None,
            "loss": loss,
            "n": acc.n,
            "thresholds": [t.to_dict() for t in result],
        }
    )


@main.command()
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=120.0, show_default=True,
              help="Wall-clock seconds to run.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rate", type=click.FloatRange(0, min_open=True), default=2000.0, show_default=True,
              help="Synthetic events per second.")
@click.option("--offline", is_flag=True, help="No broker: run the core on toy slates only.")
def demo(duration, seed, rate, offline) -> None:
    """The embedded default: local broker, worker, synthetic traffic, thresholds printed as published."""
    if offline:
        from .demo import run_offline_demo

        run_offline_demo(duration=duration)
        return
    from .live import run_live_demo

    run_live_demo(duration=duration, seed=seed, rate=rate)


@main.command()
@click.option("--loglevel", "-l", type=click.Choice(["crit", "error", "warn", "info", "debug"]), default="info",
              show_default=True)
def worker(loglevel) -> None:
    """Run the Faust worker; settings come from RISKGATE_* variables (see docs/operations.md)."""
    import gc

    from .settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as e:
        _fail(2, f"bad configuration: {e}")
    _check_local(settings)
    _check_topic_layout(settings)
    import faust

    from .app import GC_THRESHOLDS, RiskgateApp

    class Worker(faust.Worker):
        def on_setup_root_logger(self, logger, level) -> None:
            # No terminal spinner: at -l warn and above Faust's spinner sets the root
            # logger to DEBUG to spin on every record, so every debug call (aiokafka
            # and Faust log each message's key and value) built a record: ~6% of the
            # worker's CPU, and user data passing through log records.
            self.spinner = None

    gc.set_threshold(*GC_THRESHOLDS)
    rg = RiskgateApp(settings)
    try:
        # mode turns "crit" into the string "Level CRIT"; logging knows "critical".
        Worker(rg.app, loglevel={"crit": "critical"}.get(loglevel, loglevel)).execute_from_commandline()
    finally:
        rg.mark_clean_stop()


def _shard_option(ctx, param, value):
    from .ranker import Shard

    try:
        return None if value is None else Shard.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _check_local(settings) -> None:
    """Stop at start with status 2, naming the setting, if the data directory or the web address cannot be used.

    Found by running a worker: each was a traceback from deep in Faust after it had
    joined the group (OSError 98 for a web port in use, gaierror for an unknown
    host, NotADirectoryError at the clean-stop marker for a data directory under a file).
    """
    import socket

    data = settings.data_dir
    try:
        data.mkdir(parents=True, exist_ok=True)
        probe = data / ".riskgate-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        _fail(2, f"RISKGATE_DATA_DIR={data} cannot be used: {e.strerror or e}")
    where = f"RISKGATE_WEB_HOST={settings.web_host}, RISKGATE_WEB_PORT={settings.web_port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(settings.web_host, settings.web_port,
                                                             type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        _fail(2, f"{where}: the host cannot be resolved ({e.strerror})")
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as the web server binds: TIME_WAIT is no conflict)
        try:
            sock.bind(address)
        except OSError as e:
            _fail(2, f"{where}: the web views cannot listen there ({e.strerror or e})")


def _fail(status: int, message: str) -> None:
    """Stop ``riskgate worker`` at start with ``status`` and one line (no traceback)."""
    click.echo(f"riskgate worker: {message}", err=True)
    sys.exit(status)


def _check_topic_layout(settings) -> None:
    """Stop at start, naming the setting, if existing topics have other partition counts than the worker's;
    then create the missing ones with the worker's counts.

    Before, Faust created the tables' changelogs with the setting's count and then
    stopped on its own PartitionsMismatch, once records arrived: a changelog made
    with the wrong count then stayed wrong whatever the setting became. A broker
    that does not answer within RISKGATE_BROKER_WAIT (30 s; one starting beside
    the worker gets that long) stops the worker with status 1 and the last
    error: Faust would stop at once on it, with a traceback.
    """
    import asyncio

    from aiokafka.errors import KafkaError

    from .broker import BrokerRefused, describe_error, partition_counts
    from .topics import Topics, layout_problems, partition_layout

    names = Topics(settings.topic_prefix)
    shared, single = partition_layout(names, settings.app_id)
    try:
        actual = asyncio.run(partition_counts(settings.bootstrap, (*shared, *single), timeout=settings.broker_wait,
                                              **settings.kafka_kwargs()))
    except (TimeoutError, BrokerRefused) as e:
        _fail(1, f"{e}; check RISKGATE_BROKER and the RISKGATE_SECURITY_* and RISKGATE_SASL_* settings")
    problems = layout_problems(actual, names, settings.app_id, settings.topic_partitions)
    if problems:
        _fail(2, "the topics do not fit the settings:\n  " + "\n  ".join(problems))
    # Missing topics are made now, with the settings' counts: Faust makes its changelogs but
    # not its source topics, and a broker that creates topics on first use (tansu, Kafka
    # with auto-creation) made the inputs with its own default count, which stopped the
    # worker at its first record (PartitionsMismatch), changelogs already made.
    try:
        created = names.create(settings.bootstrap, settings.topic_partitions,
                               replication=settings.topic_replication_factor, **settings.kafka_kwargs())
    except (RuntimeError, KafkaError) as e:
        _fail(1, f"{describe_error(e)}; create riskgate's topics beforehand (docs/operations.md, \"Topics and "
                 "state\") or let the worker's user create them")
    if created:
        click.echo(f"riskgate worker: created topics {', '.join(created)} "
                   f"({settings.topic_partitions} partitions for inputs and safe-pools)", err=True)


@main.command("example-ranker")
@click.option("--broker", required=True, help="kafka://host:port of the broker.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--holdout-share", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True)
@click.option("--topic-prefix", default="", show_default=True)
@click.option("--shard", callback=_shard_option, default=None,
              help="I/N: hold only replica I of N's share of the users' pools (safe-pools partitions p with "
                   "p mod N = I); requests for other users get 421, or go to their shard with --peers.")
@click.option("--peers", default=None,
              help="With --shard I/N: the N shards' base URLs in shard order, comma-separated (this one's too); a "
                   "request for another shard's user is forwarded there.")
def example_ranker(broker, port, host, holdout_share, topic_prefix, shard, peers) -> None:
    """An example ranker: POST /rank applies Algorithm 1 with riskgate's live thresholds."""
    from .example_ranker import peer_urls, serve

    try:
        urls = peer_urls([u.strip() for u in peers.split(",")] if peers else [], shard)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--peers") from None
    bootstrap = broker.removeprefix("kafka://")
    with _broker_reachable("example-ranker", bootstrap):  # (at start: the ranker never served)
        serve(bootstrap, port, host, topic_prefix, holdout_share, shard, urls, **_kafka_kwargs())


@main.command()
@click.option("--broker", required=True, help="kafka://host:port of the broker.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--users", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--slates", "n_slates", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Events per second (0 = unthrottled).")
@click.option("--events", "events_path", type=click.Path(exists=True, dir_okay=False),
              help="Produce this JSONL event file instead of a synthetic world.")
@click.option("--skip", type=click.IntRange(min=0), default=0, show_default=True,
              help="Leave out the first N events (to go on after a broker was lost: the count it printed).")
def produce(broker, seed, users, n_slates, rate, events_path, skip) -> None:
    """Produce a seeded synthetic event stream (or an event file) to the input topics."""
    import asyncio
    import itertools

    from .producer import ProduceInterrupted, produce_events

    if events_path:
        from .synthetic_io import EventFileError, read_jsonl

        try:  # the whole file first: a bad line stops the command before anything is produced
            for _ in read_jsonl(events_path):
                pass
        except EventFileError as e:
            click.echo(f"riskgate produce: {e} (nothing produced)", err=True)
            sys.exit(2)
        events = read_jsonl(events_path)
    else:
        from calibration.synthetic import WorldConfig, generate_events

        events = generate_events(WorldConfig(seed=seed, n_users=users, n_slates=n_slates))
    bootstrap = broker.removeprefix("kafka://")
    span = [float("inf"), float("-inf")]  # event time of what was produced

    def timed(stream):
        for topic, value in stream:
            ts = value.get("ts")
            if isinstance(ts, (int, float)) and not isinstance(ts, bool):
                span[0], span[1] = min(span[0], ts), max(span[1], ts)
            yield topic, value

    with _broker_reachable("produce", bootstrap):
        try:
            counts = asyncio.run(produce_events(bootstrap, timed(itertools.islice(events, skip, None)),
                                                rate=rate or None, producer_kwargs=_kafka_kwargs()))
        except ProduceInterrupted as e:
            done = skip + e.acknowledged
            click.echo(f"riskgate produce: lost the broker at {bootstrap} ({e}); the first {done} events are on it. "
                       f"Go on with the same command and --skip {done} (events sent twice are dropped by "
                       f"riskgate as duplicates).", err=True)
            sys.exit(1)
    from .settings import Settings

    label_window = Settings.model_fields["label_window"].default
    seconds = span[1] - span[0] if span[1] >= span[0] else 0.0
    _dump({"produced": dict(counts), "event_time_seconds": round(seconds, 3)})
    if seconds < label_window:  # (a newcomer's first run: why the worker publishes n = 0)
        click.echo(f"riskgate produce: note: these events span {seconds:,.0f} s of event time; a slate matures "
                   f"RISKGATE_LABEL_WINDOW ({label_window:,.0f} s by default) after it was served, so a "
                   "worker with the default calibrates on none of them (more --slates, or a shorter label "
                   "window)", err=True)


@contextmanager
def _broker_reachable(command: str, bootstrap: str):
    """A broker that cannot be reached, or fails, ends the command inside with status 1 and why, not a traceback."""
    from aiokafka.errors import KafkaConnectionError, KafkaError

    try:
        yield
    except KafkaConnectionError as e:
        click.echo(f"riskgate {command}: cannot reach the broker at {bootstrap} ({e})", err=True)
        sys.exit(1)
    except KafkaError as e:
        from .broker import describe_error

        click.echo(f"riskgate {command}: the broker at {bootstrap} failed ({describe_error(e)})", err=True)
        sys.exit(1)


@main.command("dlq-replay")
@click.option("--broker", required=True, help="kafka://host:port of the broker.")
@click.option("--reason", "reasons", multiple=True,
              help="Replay only dead letters with this reason code (e.g. unreadable_state); repeat. Default: all.")
@click.option("--key", "keys", multiple=True, help="Replay only this user's (record key); repeat. Default: all.")
@click.option("--from-offset", "start", type=click.IntRange(min=0), default=0, show_default=True,
              help="First DLQ offset to read (the next_offset a previous replay printed).")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; produce nothing.")
def dlq_replay(broker, reasons, keys, start, dry_run) -> None:
    """Produce dead letters' original key and value again to the input topic each came from, in DLQ order.

    For after the cause is fixed: a producer corrected, or a user's unreadable
    state repaired (docs/operations.md). Topic prefix and credentials come from
    the RISKGATE_* settings, as for the worker.
    """
    import asyncio

    from .dlq import ReplayInterrupted, replay_dead_letters
    from .settings import SettingsError, load_settings
    from .topics import Topics

    try:
        settings = load_settings()
    except SettingsError as e:
        raise click.UsageError(f"bad configuration: {e}") from None
    bootstrap = broker.removeprefix("kafka://")
    with _broker_reachable("dlq-replay", bootstrap):
        try:
            _dump(asyncio.run(replay_dead_letters(
                bootstrap, Topics(settings.topic_prefix), reasons=reasons, keys=[k.encode() for k in keys],
                start=start, dry_run=dry_run, client_kwargs=settings.kafka_kwargs())))
        except ReplayInterrupted as e:
            click.echo(f"riskgate dlq-replay: lost the broker at {bootstrap} ({e}) after replaying "
                       f"{sum(e.replayed.values())} dead letters; go on with the same command and "
                       f"--from-offset {e.offset}.", err=True)
            sys.exit(1)


@main.group()
def bench() -> None:
    """Benchmarks that print figures (never pass/fail)."""


@bench.command("calibrate")
@click.option("--slates", "n_slates", type=click.IntRange(min=1), default=1_000_000, show_default=True)
@click.option("--items", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--alphas", "n_alphas", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--grid-size", type=click.IntRange(min=1), default=1001, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def bench_calibrate(n_slates, items, n_alphas, grid_size, seed) -> None:
    """Fold N slates into a window and time λ̂ for several α."""
    from .bench import bench_calibrate as run

    run(n_slates=n_slates, items=items, n_alphas=n_alphas, grid_size=grid_size, seed=seed)


def _inprocess_backlog(command):
    """``--events``, ``--users``, ``--seed`` of the benches that run `bench stream`'s backlog in process.

    One set for both, so that their defaults cannot drift apart: the two are
    compared as the README writes them.
    """
    command = click.option("--seed", type=int, default=0, show_default=True)(command)
    command = click.option("--users", type=click.IntRange(min=1), default=50_000, show_default=True)(command)
    return click.option("--events", "n_events", type=click.IntRange(min=1), default=300_000,
                        show_default=True)(command)


@bench.command("inprocess")
@_inprocess_backlog
def bench_inprocess(n_events, users, seed) -> None:
    """The worker's own work per event without Kafka (decode, engine, outputs, table flush, batch encoding)."""
    from .bench_inprocess import InprocessConfig, bench_inprocess as run

    run(InprocessConfig(events=n_events, users=users, seed=seed))


@bench.command("columnar")
@_inprocess_backlog
def bench_columnar(n_events, users, seed) -> None:
    """A floor of what a columnar users' state would cost, on `bench inprocess`'s events (a design not built)."""
    from .bench_columnar import bench_columnar as run
    from .bench_inprocess import InprocessConfig

    run(InprocessConfig(events=n_events, users=users, seed=seed))


@bench.command("stream")
@click.option("--events", "n_events", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Backlog size: synthetic events produced before the worker starts.")
@click.option("--users", type=click.IntRange(min=1), default=50_000, show_default=True)
@click.option("--partitions", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--broker", default=None, help="host:port of a broker to use instead of a local tansu.")
@click.option("--live-seconds", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Then produce live traffic for this long (freshness, RSS, soak).")
@click.option("--live-rate", type=click.FloatRange(0, min_open=True), default=20_000.0, show_default=True,
              help="Live events/s.")
@click.option("--live-producers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Producer processes sharing --live-rate (one tops out near 80k events/s here).")
@click.option("--recompute-interval", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True)
@click.option("--profile", type=click.Path(dir_okay=False), default=None,
              help="Record the worker with py-spy to this file and print where its time went.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON.")
@click.option("--worker-env", multiple=True, help="Extra RISKGATE_NAME=value for the worker; repeat.")
@click.option("--keep", is_flag=True, help="Keep the worker's log and data directory (its path is printed).")
@click.option("--workers", type=click.IntRange(1, 16), default=1, show_default=True,
              help="More than one: workers of one group on the backlog (no live phase, no profile); their "
                   "combined rate once every one of them applies records.")
@click.option("--restore/--no-restore", default=True, show_default=True,
              help="Then time a new worker on an empty directory restoring the tables from their changelogs.")
@click.option("--crash/--no-crash", default=True, show_default=True,
              help="After the restore, kill that worker and time another restarting on its directory.")
@click.option("--malformed-share", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Share of the backlog's watch events made invalid: the worker's rate with dead letters.")
def bench_stream(n_events, users, partitions, seed, broker, live_seconds, live_rate, live_producers,
                 recompute_interval, profile, out, worker_env, keep, workers, restore, crash, malformed_share) -> None:
    """One worker against a real broker: throughput vs. a bare consumer, lag, freshness, RSS, RocksDB size."""
    from .bench_stream import StreamBenchConfig, bench_stream as run

    if workers > 1 and (live_seconds or profile):
        raise click.BadParameter("--workers > 1 measures the backlog only (no --live-seconds, no --profile)",
                                 param_hint="--workers")
    env = {}
    for kv in worker_env:
        name, sep, value = kv.partition("=")
        if not sep or not name.startswith("RISKGATE_"):
            raise click.BadParameter(f"{kv!r} is not RISKGATE_NAME=value", param_hint="--worker-env")
        env[name] = value
    run(StreamBenchConfig(events=n_events, users=users, partitions=partitions, seed=seed, broker=broker,
                          live_seconds=live_seconds, live_rate=live_rate, live_producers=live_producers,
                          recompute_interval=recompute_interval, profile=profile, out=out, worker_env=env,
                          keep=keep, workers=workers, restore=restore, crash=crash, malformed_share=malformed_share))


@main.command()
@click.option("--events", "events_path", type=click.Path(exists=True, dir_okay=False),
              help="JSONL event file, one {\"topic\", \"value\"} per line (.gz ok).")
@click.option("--synthetic", is_flag=True, help="Replay a seeded synthetic world instead of a file.")
@click.option("--seed", type=int, default=0, show_default=True, help="--synthetic: world seed.")
@click.option("--users", type=click.IntRange(min=1), default=2000, show_default=True, help="--synthetic: number of users.")
@click.option("--slates", "n_slates", type=click.IntRange(min=1), default=20000, show_default=True,
              help="--synthetic: number of slates.")
@click.option("--table1-rates", is_flag=True, help="--synthetic: the paper's Table-1 reporting rates (tiny α only).")
@click.option("--kuairand", "kuairand_path", type=click.Path(exists=True, dir_okay=False),
              help="A KuaiRand standard-log CSV (or the processed TSV slice).")
@click.option("--alpha", "alphas", multiple=True, type=float, callback=_alpha,
              help="Target risk level; repeat for several. Default: 0.01..0.08.")
@click.option("--strategy", "strategies", multiple=True, type=click.Choice(STRATEGIES),
              help="Repeat for several; default both.")
@click.option("--guarantee", type=click.Choice(GUARANTEES), default="expectation", show_default=True)
@click.option("--delta", type=float, default=0.1, show_default=True)
@click.option("--loss", type=click.Choice(LOSSES), default="fraction", show_default=True)
@click.option("--beta", type=str, default="0", show_default=True, help="Safe-pool W% threshold β, or 'none'.")
@click.option("--beta-ablation", is_flag=True, help="Also replay β in 0%, 50%, 100%, none (Fig. 5).")
@click.option("--group-policy", type=click.Choice(["global", "fallback"]), default="global", show_default=True,
              help="λ̂ from the global group (paper) or user → band → global (SPEC §8).")
@click.option("--label-window", type=click.FloatRange(0, min_open=True), default=3600.0, show_default=True,
              help="Seconds until labels are final.")
@click.option("--window", type=click.FloatRange(0, min_open=True), default=86400.0, show_default=True,
              help="Calibration window, seconds.")
@click.option("--min-slates", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--dump-slates", type=click.Path(dir_okay=False),
              help="Also write the final global window's mature slates (riskgate calibrate input).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def replay(events_path, synthetic, seed, users, n_slates, table1_rates, kuairand_path, alphas, strategies, guarantee,
           delta, loss, beta, beta_ablation, group_policy, label_window, window, min_slates, out_dir, dump_slates,
           progress) -> None:
    """Replay an event stream through the engine and write the what-if report (PNG, HTML, JSON)."""
    from dataclasses import replace as _replace

    from calibration.backtest import ABLATION_BETAS
    from calibration.engine import EngineConfig
    from calibration.user_state import Limits

    from .replay import ReplayConfig, replay as run_replay, synthetic_world, write_slates_jsonl
    from .report import write_report

    if sum(map(bool, (events_path, synthetic, kuairand_path))) != 1:
        raise click.UsageError("give exactly one of --events, --synthetic, --kuairand")
    try:
        beta_v = None if beta.lower() == "none" else float(beta)
    except ValueError:
        raise click.BadParameter(f"{beta!r} is neither a number nor 'none'", param_hint="--beta") from None
    from .kuairand_io import KuaiRandFileError
    from .synthetic_io import EventFileError

    ecfg = EngineConfig(
        alphas=tuple(alphas) or (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08),
        strategies=tuple(dict.fromkeys(strategies)) or ("remove", "replace"),
        guarantee=guarantee, delta=delta if guarantee == "high_probability" else None, loss=loss,
        label_window=label_window, window=window, min_slates=min_slates,
    )
    ecfg = _replace(ecfg, limits=Limits(beta=beta_v))
    made = not Path(out_dir).exists()
    try:  # before the replay, which may take minutes: a folder that cannot be made fails now
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f"{out_dir} cannot be created: {e.strerror or e}", param_hint="--out") from None
    cfg = ReplayConfig(engine=ecfg, ablation_betas=ABLATION_BETAS if beta_ablation else None,
                       group_policy=group_policy, keep_window=bool(dump_slates), progress=progress)
    try:  # a bad line of an event or KuaiRand file: PATH:LINE and status 2, like `riskgate calibrate`
        if synthetic:
            from calibration.synthetic import generate_events

            world = synthetic_world(seed, users, n_slates, table1=table1_rates)
            events = generate_events(world)
            title = f"riskgate replay: synthetic world (seed {seed}, {users} users, {n_slates} slates)"
        elif kuairand_path:
            from .kuairand_io import read_kuairand

            events = read_kuairand(kuairand_path)  # (reads and sorts the whole file here)
            title = f"riskgate replay: KuaiRand {kuairand_path}"
        else:
            from .synthetic_io import read_jsonl

            events = read_jsonl(events_path)
            title = f"riskgate replay: {events_path}"
        result = run_replay(events, cfg)  # (an event file is read as it replays)
    except (EventFileError, KuaiRandFileError) as e:
        if made:
            Path(out_dir).rmdir()  # (empty: nothing is written before the replay ends)
        click.echo(f"riskgate replay: {e} (no report written)", err=True)
        sys.exit(2)
    paths = write_report(result, out_dir, title=title)
    if dump_slates:
        write_slates_jsonl(result.window_slates, dump_slates)
    main_rows = [r for r in result.main.rows if r["population"] == "all" and r["strategy"] != "none"]
    _dump({
        "report": str(paths["index.html"]),
        "evaluated_slates": result.counts.get("evaluated_slates", 0),
        "invalid_events": result.counts.get("invalid_events", 0),
        "base_risk": result.main.row("none", None)["risk"],
        "realised": [{"strategy": r["strategy"], "alpha": r["alpha"], "risk": r["risk"], "ndcg": r["ndcg"],
                      "size": r["size"]} for r in main_rows],
    })


if __name__ == "__main__":  # pragma: no cover
    main()
