"""``riskgate demo``, the first of the README's two commands, run as a newcomer runs it.

It always uses the embedded broker (the local ``tansu``; that is what the
command is for), so unlike the other integration tests it does not take
``kafka_bootstrap``. It must exit 0 and print threshold updates as the worker
publishes them: versions that grow per key, and, within 30 s of synthetic
traffic, a global λ̂ calibrated on matured slates (n > 0, a number for some α).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

LINE = re.compile(r"^v(\d+)\s+(remove|replace):(\S+)\s+n=(\d+)\s+(.*)$")


def test_the_demo_prints_thresholds_as_the_worker_publishes_them(tmp_path):
    env = dict(os.environ, COLUMNS="240")  # one line per update (rich wraps at the terminal's width)
    env = {k: v for k, v in env.items() if not k.startswith("RISKGATE_")}  # the demo's own settings only
    out = subprocess.run([sys.executable, "-m", "streams.cli", "demo", "--duration", "30"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    updates = [LINE.match(line) for line in out.stdout.splitlines()]
    updates = [m for m in updates if m]
    assert len(updates) >= 6, out.stdout[-3000:]  # every strategy × shared group at least once
    versions: dict[str, list[int]] = {}
    for m in updates:
        versions.setdefault(f"{m[2]}:{m[3]}", []).append(int(m[1]))
    assert {"remove:global", "replace:global", "remove:band:low", "replace:band:high"} <= set(versions)
    assert all(a < b for v in versions.values() for a, b in zip(v, v[1:])), versions  # each update a new version
    calibrated = [m for m in updates if m[3] == "global" and int(m[4]) > 0 and "λ̂=" in m[5]]
    assert calibrated, "no global threshold calibrated on matured slates within 30 s:\n" + out.stdout[-3000:]
    assert re.search(r"produced [\d,]+ events, \d+ threshold updates", out.stdout)


def _alive(pid: int) -> bool:
    """Running, not a zombie: the demo's children are in sessions of their own, and nothing may reap them here."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_terminated_demo_stops_its_broker_and_worker_and_removes_its_files(tmp_path):
    """Found by running it under ``timeout``: SIGTERM ended the demo at once and left its tansu broker
    and worker running (each in a session of its own) and their directories behind. Ctrl-C cleaned up."""
    env = {k: v for k, v in dict(os.environ, COLUMNS="240").items() if not k.startswith("RISKGATE_")}
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "demo", "--duration", "300"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    header = ""
    try:
        deadline = time.monotonic() + 120
        while "web views" not in header and time.monotonic() < deadline:  # (readline: the lines come as printed)
            line = proc.stdout.readline()
            if not line:
                break
            header += line
        broker = re.search(r"\(pid (\d+)\), data in (\S+)", header)
        worker = re.search(r"worker pid (\d+)", header)
        assert broker and worker, header
        pids = [int(broker[1]), int(worker[1])]
        assert all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        # more while it cleans up, as an impatient user sends them (tests/test_cli_bad_files.py checks
        # that they are ignored then: one landing before the worker was signalled left it running)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            time.sleep(0.05)
            proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    # "stopped" is printed once the cleanup is done; a signal that comes after it then ends the
    # process as it would any other (SIGTERM: -15; SIGINT: click's "Aborted!", 1)
    assert "stopped" in rest and proc.returncode in (0, 1, -signal.SIGTERM), header + rest
    assert not any(_alive(p) for p in pids), pids
    assert not os.path.exists(broker[2])
