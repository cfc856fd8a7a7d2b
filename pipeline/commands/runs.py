"""`pomvid runs list` and `pomvid runs compare`: read MLflow runs back from the terminal;
`pomvid runs sync`: send what a run left unsent (its server was down, or its process was killed).

    pomvid runs list --experiment pomvid --output-dir outputs/tiny
    pomvid runs list --columns name,loss,train.lr,eval/fvd --format markdown
    pomvid runs compare --experiment pomvid --output-dir outputs/tiny --metric train/loss
    pomvid runs compare --tracking-uri http://127.0.0.1:5000 --runs 3f2a9c1e b81d0e4f --format markdown
    pomvid runs compare --output-dir outputs/tiny --html compare.html    # one page: table + plots
    pomvid runs sync outputs/tiny [--tracking-uri http://127.0.0.1:5000]

Works against the embedded SQLite store of an output folder (`--output-dir`) and against a server
(`--tracking-uri`, or MLFLOW_TRACKING_URI) alike.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DEFAULT_MAX_COMPARE = 10


def _store_args(parser: argparse.ArgumentParser) -> None:
    from pipeline.tracking.report import FORMATS
    from pipeline.tracking.run import DEFAULT_EXPERIMENT

    parser.add_argument(
        "--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name (default: %(default)s)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (server or sqlite:///...)")
    where.add_argument(
        "--output-dir", default=None, help="output folder holding the embedded store mlflow.db"
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "runs",
        help="list and compare tracked runs (MLflow)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="runs_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    listing = actions.add_parser("list", help="one line per run: status, duration, steps, loss, eval metrics")
    _store_args(listing)
    listing.add_argument(
        "--columns",
        default=None,
        help="comma-separated columns: run_id,name,status,start,duration,recipe,steps,loss,eval (the default), "
        "or any param (train.lr) or metric (train/samples_per_s, eval/fvd)",
    )
    listing.add_argument("--param", nargs="+", default=None, help="params to add as columns")
    listing.add_argument("--metric", nargs="+", default=None, help="metrics to add as columns")
    listing.add_argument(
        "--max-runs", type=int, default=100, help="newest runs to list (default: %(default)s)"
    )
    listing.set_defaults(func=run_list)

    compare = actions.add_parser("compare", help="differing params, final/best metrics and plots of runs")
    _store_args(compare)
    compare.add_argument(
        "--runs",
        nargs="+",
        default=None,
        help=f"run ids, id prefixes or run names (default: the {DEFAULT_MAX_COMPARE} newest runs)",
    )
    compare.add_argument(
        "--metric",
        nargs="+",
        default=None,
        help="metrics to compare (default: all but system/); throughput metrics are always shown",
    )
    compare.add_argument(
        "--maximize",
        nargs="+",
        default=(),
        help="metrics where higher is better "
        "(default: throughput and accuracy-like names; everything else: lower is better)",
    )
    compare.add_argument("--minimize", nargs="+", default=(), help="metrics where lower is better")
    compare.add_argument("--system", action="store_true", help="also compare system/ metrics")
    compare.add_argument(
        "--max-runs",
        type=int,
        default=DEFAULT_MAX_COMPARE,
        help="newest runs to compare when --runs is not given (default: %(default)s)",
    )
    compare.add_argument(
        "--out",
        default=None,
        help="folder for the plots "
        "(default: <output-dir>/compare/<experiment>, or ./pomvid-compare/<experiment>)",
    )
    compare.add_argument("--no-plots", action="store_true", help="print the table only")
    compare.add_argument(
        "--html", default=None, metavar="FILE", help="also write one self-contained page (table and plots)"
    )
    compare.set_defaults(func=run_compare)

    sync = actions.add_parser(
        "sync", help="send the logging calls a run left unsent in <RUN_DIR>/mlflow_spool (idempotent)"
    )
    sync.add_argument("run_dir", metavar="RUN_DIR", help="a run's output folder (training or precompute)")
    sync.add_argument(
        "--tracking-uri", default=None, help="send there instead of the URI the run was logged to"
    )
    sync.set_defaults(func=run_sync)


def _positive(value: int, flag: str) -> None:
    if value < 1:
        raise SystemExit(f"pomvid runs: {flag} must be >= 1, got {value}")


def run_list(args: argparse.Namespace) -> int:
    import shutil

    from pipeline.tracking.compare import find_experiment, open_store, search_runs
    from pipeline.tracking.listing import build_list, fit_width, list_rows
    from pipeline.tracking.report import render
    from pipeline.tracking.uri import TrackingError

    _positive(args.max_runs, "--max-runs")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        client, uri = open_store(args.tracking_uri, args.output_dir)
        experiment = find_experiment(client, args.experiment, uri)
        runs = search_runs(client, experiment.experiment_id, args.max_runs)
        data = build_list(runs, columns=columns, params=args.param, metrics=args.metric)
    except TrackingError as err:
        print(f"pomvid runs list: error: {err}", file=sys.stderr)
        return 1
    if not runs:
        print(f"no runs in experiment {args.experiment!r} at {uri}", file=sys.stderr)
        return 0
    rows = list_rows(data)
    if args.format == "table":
        width = shutil.get_terminal_size((120, 24)).columns
        rows, dropped = fit_width(rows, width, cuttable=("name", "recipe", *(args.param or ())))
        if dropped:
            print(f"(left out to fit {width} characters: {', '.join(dropped)}; choose with --columns, or use "
                  "--format csv|json|markdown)", file=sys.stderr)
    print(render(rows, {"experiment": args.experiment, "tracking_uri": uri, **data}, args.format))
    return 0


def _default_out(args: argparse.Namespace) -> Path:
    safe = re.sub(r"[^\w.\-]+", "_", args.experiment).strip("_") or "experiment"
    base = Path(args.output_dir) / "compare" if args.output_dir else Path("pomvid-compare")
    return base / safe


def run_compare(args: argparse.Namespace) -> int:
    from pipeline.tracking.compare import find_experiment, open_store, search_runs, select_runs
    from pipeline.tracking.report import build_comparison, compare_rows, protocol_notes, render
    from pipeline.tracking.uri import TrackingError

    _positive(args.max_runs, "--max-runs")
    try:
        client, uri = open_store(args.tracking_uri, args.output_dir)
        experiment = find_experiment(client, args.experiment, uri)
        runs = search_runs(client, experiment.experiment_id, 1000 if args.runs else args.max_runs + 1)
        if args.runs:
            runs = select_runs(runs, args.runs)
        elif len(runs) > args.max_runs:
            runs = runs[: args.max_runs]
            print(f"comparing the {args.max_runs} newest runs; pass --runs or --max-runs", file=sys.stderr)
        data, curves = build_comparison(
            client,
            runs,
            metrics=args.metric,
            maximize=args.maximize,
            minimize=args.minimize,
            include_system=args.system,
        )
    except TrackingError as err:
        print(f"pomvid runs compare: error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else _default_out(args)
    plots = {} if args.no_plots else _plots(curves, data, out)
    data = {
        "experiment": args.experiment,
        "tracking_uri": uri,
        **data,
        "plots": {metric: str(path) for metric, path in plots.items()},
    }
    rows = compare_rows(data)
    notes = protocol_notes(data)
    print(render(rows, data, args.format))
    # Keep stdout machine-readable for csv/json: notes and locations go to stderr there.
    stream = sys.stdout if args.format in ("table", "markdown") else sys.stderr
    if notes:
        print("\neval protocols:\n" + "\n".join(f"  {n}" for n in notes), file=stream)
    if plots:
        print(f"\nplots ({len(plots)} PNG, one curve per run): {out.resolve()}", file=stream)
    if args.html:
        from pipeline.tracking.html import render_html, write_html

        page = render_html(rows, title=f"pomvid runs: {args.experiment}", plots=plots, notes=notes, source=uri)
        print(f"page: {write_html(args.html, page).resolve()}", file=stream)
    return 0


def _plots(curves: dict, data: dict, out: Path) -> dict:
    """One PNG per metric, and eval_metrics.png with every eval metric and protocol against steps."""
    from pipeline.tracking.plots import EVAL_PLOT, plot_eval_metrics, plot_metrics

    evals = {name: curves.pop(name) for name in data.get("eval", {})}
    plots = {}
    if evals:
        plots["eval metrics"] = plot_eval_metrics(evals, out / EVAL_PLOT)
    plots.update(plot_metrics(curves, out))
    return plots


def run_sync(args: argparse.Namespace) -> int:
    """Exit 0 when every spool is fully sent, 1 when something is left, 2 when RUN_DIR has no spool."""
    from pipeline.tracking.sync import sync_runs
    from pipeline.tracking.uri import TrackingError

    try:
        results = sync_runs(args.run_dir, args.tracking_uri)
    except TrackingError as err:
        print(f"pomvid runs sync: error: {err}", file=sys.stderr)
        return 2
    for result in results:
        print(result.describe(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if all(result.ok for result in results) else 1
