"""``riskgate calibrate``: same λ̂ as the reference, and bad files rejected by line."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from calibration.grid import make_grid
from calibration.toy import toy_batch
from streams.cli import main

from . import reference as ref


def _write(path, batch):
    with open(path, "w") as fh:
        for s in batch.slates():
            fh.write(json.dumps({"k": s.k, "safe_pool_size": s.pool, "slate_id": "x",
                                 "items": [{"score": x, "flagged": h} for x, h in zip(s.scores, s.flags)]}) + "\n")


def _run(*args):
    return CliRunner().invoke(main, ["calibrate", *map(str, args)])


@pytest.mark.parametrize("strategy", ["remove", "replace"])
@pytest.mark.parametrize("guarantee", ["expectation", "high_probability"])
def test_calibrate_matches_reference(tmp_path, strategy, guarantee):
    batch = toy_batch(np.random.default_rng(3), 150, m=6, ragged=True, rate=0.15)
    path = tmp_path / "slates.jsonl"
    _write(path, batch)
    res = _run("--slates", path, "--alpha", 0.05, "--alpha", 0.1, "--alpha", 0.2, "--strategy", strategy,
               "--guarantee", guarantee, "--delta", 0.1, "--grid-min", 0, "--grid-max", 1, "--grid-size", 51)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 150 and out["strategy"] == strategy and out["guarantee"] == guarantee
    assert out["loss"] == "fraction"
    assert out["delta"] == (0.1 if guarantee == "high_probability" else None)
    grid = make_grid(0, 1, 51)
    want, S = ref.lambda_hat(batch.slates(), grid.values, [0.05, 0.1, 0.2], strategy, "fraction", guarantee, 0.1)
    for t, g in zip(out["thresholds"], want):
        if g == len(grid) - 1:
            assert t["filter_all"] and t["lambda"] is None
        else:
            assert not t["filter_all"] and t["lambda"] == grid.values[g]
        assert t["risk_at_lambda"] == pytest.approx(S[g] / 150, abs=1e-9)
    assert [t["alpha"] for t in out["thresholds"]] == [0.05, 0.1, 0.2]
    assert any(not t["filter_all"] for t in out["thresholds"])


def test_calibrate_per_slot_loss_is_named(tmp_path):
    path = tmp_path / "s.jsonl"
    _write(path, toy_batch(np.random.default_rng(1), 50, m=5))
    res = _run("--slates", path, "--alpha", 0.1, "--loss", "per_slot")
    assert res.exit_code == 0 and json.loads(res.stdout)["loss"] == "per_slot"


GOOD = '{"k": 3, "safe_pool_size": 1, "items": [{"score": 0.5, "flagged": false}]}'


@pytest.mark.parametrize(
    "bad, needle",
    [
        ('{"k": 3, "safe_pool_size": 1, "items": [{"score": 0.5, "flagged": fals}]}', "bad JSON"),
        ('{"k": 3, "safe_pool_size": 1, "items": [{"score": NaN, "flagged": false}]}', "bad JSON"),
        ('{"k": 3, "safe_pool_size": 1, "items": [{"score": 1e999, "flagged": false}]}', ""),
        ('{"k": 0, "safe_pool_size": 1, "items": []}', "k"),
        ('{"k": 3, "items": []}', "safe_pool_size"),
        ('{"k": 3, "safe_pool_size": 1, "items": [{"flagged": false}]}', "items.0.score"),
        ('{"k": 3, "safe_pool_size": 1, "items": [{"score": "0.5", "flagged": false}]}', "items.0.score"),
        ('{"k": 3, "safe_pool_size": 1, "items": [{"score": 0.5, "flagged": 1}]}', "items.0.flagged"),
        ('{"k": 1, "safe_pool_size": 0, "items": [{"score": 0.5, "flagged": false}, {"score": 0.4, "flagged": false}]}', "exceed k"),
        ('[1, 2]', "JSON object"),
        ('{"k": 3, "safe_pool_size": -1, "items": []}', "safe_pool_size"),
        ('{"k": 3, "safe_pool_size": 1, "items": [{"score": null, "flagged": false}]}', "null only for a blocked item"),
        ('{"k": 3, "safe_pool_size": 1, "items": [{"score": 0.5, "flagged": false, "blocked": 1}]}',
         "items.0.blocked"),
    ],
)
def test_bad_line_fails_naming_line_and_problem(tmp_path, bad, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([GOOD, GOOD, bad, GOOD]) + "\n")
    res = _run("--slates", path, "--alpha", 0.1)
    assert res.exit_code == 2
    assert res.stdout == ""  # never thresholds from part of the data
    assert f"bad.jsonl:3:" in res.stderr
    assert needle in res.stderr


def test_bad_alpha_is_a_usage_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(GOOD + "\n")
    res = _run("--slates", path, "--alpha", 1.5)
    assert res.exit_code == 2 and "1.5 is not in (0, 1)" in res.stderr


def test_empty_file_filters_everything(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    res = _run("--slates", path, "--alpha", 0.1)
    out = json.loads(res.stdout)
    assert out["n"] == 0 and out["thresholds"][0]["filter_all"] and out["thresholds"][0]["risk_at_lambda"] is None


@pytest.mark.parametrize("strategy", ["remove", "replace"])
def test_a_blocked_item_calibrates_as_the_slate_without_it(tmp_path, strategy):
    """An item its user's tag rules dropped is never kept, whatever its score, and its flag never counts:
    the λ̂ is that of the slates the ranker serves without it (SPEC §8)."""
    from streams.slate_file import item_json

    rng = np.random.default_rng(11)
    with_blocked, without = tmp_path / "with.jsonl", tmp_path / "without.jsonl"
    lines_with, lines_without = [], []
    for _ in range(300):
        items = [(float(rng.random()), bool(rng.random() < 0.15), bool(rng.random() < 0.2)) for _ in range(6)]
        lines_with.append({"k": 6, "safe_pool_size": 2,
                           "items": [item_json(float("-inf") if b else sc, f) for sc, f, b in items]})
        lines_without.append({"k": 6, "safe_pool_size": 2,
                              "items": [{"score": sc, "flagged": f} for sc, f, b in items if not b]})
    assert any(i.get("blocked") and i["flagged"] for line in lines_with for i in line["items"])
    for path, lines in ((with_blocked, lines_with), (without, lines_without)):
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ("--alpha", 0.1, "--alpha", 0.2, "--strategy", strategy, "--grid-size", 101)
    a, b = _run("--slates", with_blocked, *args), _run("--slates", without, *args)
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert json.loads(a.stdout)["thresholds"] == json.loads(b.stdout)["thresholds"]


def test_an_explicit_grid_gives_the_reference_lambda_on_it(tmp_path):
    batch = toy_batch(np.random.default_rng(4), 200, m=5, rate=0.1)
    path = tmp_path / "s.jsonl"
    _write(path, batch)
    values = [0.05, 0.2, 0.33, 0.5, 0.71, 0.9]
    res = _run("--slates", path, "--alpha", 0.1, "--alpha", 0.2, "--strategy", "remove",
               "--grid-values", ",".join(map(str, values)))
    assert res.exit_code == 0, res.output
    want, _ = ref.lambda_hat(batch.slates(), values + [float("inf")], [0.1, 0.2], "remove")
    got = [t["lambda"] for t in json.loads(res.stdout)["thresholds"]]
    assert got == [None if g == len(values) else values[g] for g in want]
    assert any(x is not None for x in got)
    for bad in ("0.1,x", "0.1,inf", ""):
        res = _run("--slates", path, "--alpha", 0.1, "--grid-values", bad)
        assert res.exit_code == 2 and "--grid-values" in res.stderr and res.stdout == ""
