"""The ``riskgate`` command line.

Sub-commands import what they need lazily, so ``riskgate calibrate`` does not
pay for importing Faust.
"""

from __future__ import annotations

import sys

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
def calibrate(slates_path, alphas, strategy, guarantee, delta, loss, grid_min, grid_max, grid_size) -> None:
    """λ̂ for each --alpha from a file of mature slates (JSON on stdout)."""
    from calibration.grid import make_grid
    from calibration.threshold import thresholds
    from calibration.window import CurveAccumulator

    from .slate_file import SlateFileError, read_slates

    if guarantee == "high_probability" and not 0.0 < delta < 1.0:
        raise click.BadParameter(f"{delta} is not in (0, 1)", param_hint="--delta")
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
@click.option("--duration", type=float, default=30.0, show_default=True, help="Wall-clock seconds to run.")
def demo(duration) -> None:
    """The embedded default: thresholds printed as they are published."""
    from .demo import run_offline_demo

    run_offline_demo(duration=duration)


@main.group()
def bench() -> None:
    """Benchmarks that print figures (never pass/fail)."""


@bench.command("calibrate")
@click.option("--slates", "n_slates", type=int, default=1_000_000, show_default=True)
@click.option("--items", type=int, default=20, show_default=True)
@click.option("--alphas", "n_alphas", type=int, default=8, show_default=True)
@click.option("--grid-size", type=int, default=1001, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def bench_calibrate(n_slates, items, n_alphas, grid_size, seed) -> None:
    """Fold N slates into a window and time λ̂ for several α."""
    from .bench import bench_calibrate as run

    run(n_slates=n_slates, items=items, n_alphas=n_alphas, grid_size=grid_size, seed=seed)


if __name__ == "__main__":  # pragma: no cover
    main()
