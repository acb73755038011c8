"""``riskgate worker`` stops at start, with status 2 and one line naming the setting, when its data
directory or web address cannot be used: before, each was a traceback from deep in Faust after the
worker had joined its group. No broker is needed: these checks come first."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from streams.cli import main


def _run(tmp_path, **env):
    base = {"RISKGATE_DATA_DIR": str(tmp_path / "data"), "RISKGATE_BROKER": "kafka://127.0.0.1:1",
            "RISKGATE_BROKER_WAIT": "0"}
    return CliRunner().invoke(main, ["worker"], env={**base, **{f"RISKGATE_{k.upper()}": v for k, v in env.items()}})


def test_a_data_directory_under_a_file_is_named(tmp_path):
    (tmp_path / "a-file").write_text("")
    res = _run(tmp_path, data_dir=str(tmp_path / "a-file" / "data"))
    assert res.exit_code == 2
    assert f"RISKGATE_DATA_DIR={tmp_path / 'a-file' / 'data'} cannot be used: Not a directory" in res.stderr


def test_a_web_port_in_use_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = _run(tmp_path, web_port=str(port))
    assert res.exit_code == 2
    assert f"RISKGATE_WEB_PORT={port}: the web views cannot listen there (Address already in use)" in res.stderr


def test_a_web_host_that_does_not_resolve_is_named(tmp_path):
    res = _run(tmp_path, web_host="no-such-host.invalid")
    assert res.exit_code == 2
    assert "RISKGATE_WEB_HOST=no-such-host.invalid" in res.stderr and "cannot be resolved" in res.stderr


def test_usable_ones_pass_on_to_the_broker_check(tmp_path):
    """The checks refuse only what cannot work: with a usable directory and port the worker goes on
    and stops at the (absent) broker, status 1."""
    res = _run(tmp_path)
    assert res.exit_code == 1 and "no broker at 127.0.0.1:1" in res.stderr
    assert (tmp_path / "data").is_dir() and not list((tmp_path / "data").iterdir())  # (the probe is gone)
