"""Run comparison logic and its renderings, on fake runs (no MLflow store)."""

from __future__ import annotations

import csv
import io
import json
from types import SimpleNamespace

import pytest

from pipeline.tracking import TrackingError
from pipeline.tracking.compare import (
    differing_params,
    direction,
    is_throughput,
    run_labels,
    select_runs,
    summarize,
)
from pipeline.tracking.listing import build_list, fit_width, list_rows
from pipeline.tracking.report import build_comparison, compare_rows, protocol_notes, render


def fake_run(run_id, name, params, history, status="FINISHED", tags=None):
    final = {k: sorted(v)[-1][1] for k, v in history.items()}
    latest = [SimpleNamespace(key=k, step=sorted(v)[-1][0], value=sorted(v)[-1][1]) for k, v in history.items()]
    info = SimpleNamespace(
        run_id=run_id, run_name=name, status=status, start_time=1_700_000_000_000, end_time=1_700_000_090_000
    )
    data = SimpleNamespace(params=params, metrics=final, tags=tags or {}, _metric_objs=latest)
    return SimpleNamespace(info=info, data=data, history=history)


class FakeClient:
    def __init__(self, runs):
        self.runs = {r.info.run_id: r for r in runs}

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s, value=v) for s, v in self.runs[run_id].history[key]]


RUNS = [
    fake_run(
        "aaaaaaaa11",
        "fast",
        {"lr": "0.001", "width": "64", "seed": "0"},
        {
            "train/loss": [(0, 1.0), (1, 0.3), (2, 0.4)],
            "train/samples_per_s": [(0, 10.0), (1, 30.0), (2, 20.0)],
        },
    ),
    fake_run(
        "bbbbbbbb22",
        "slow",
        {"lr": "0.0001", "width": "64"},
        {"train/loss": [(0, 1.0), (1, 0.9)], "system/cpu_utilization_percentage": [(0, 50.0)]},
        status="RUNNING",
    ),
]


def test_best_is_min_for_losses_and_max_for_throughput():
    assert direction("train/loss") == "min" and direction("val/fvd") == "min"
    assert direction("train/samples_per_s") == "max" and direction("tflops") == "max"
    assert direction("eval/accuracy") == "max" and direction("precompute/elapsed_s") == "min"
    assert direction("train/loss", maximize=["train/loss"]) == "max"
    assert direction("train/samples_per_s", minimize=["train/samples_per_s"]) == "min"
    assert is_throughput("precompute/clips_per_s") and not is_throughput("step_time_s")
    assert summarize([(0, 1.0), (2, 0.4), (1, 0.3)], "min", with_mean=True) == {
        "final": 0.4,
        "final_step": 2,
        "best": 0.3,
        "best_step": 1,
        "mean": pytest.approx(1.7 / 3),
    }
    assert summarize([], "min") == {}


def test_params_that_differ_and_run_selection():
    assert differing_params(RUNS) == {"lr": ["0.001", "0.0001"], "seed": ["0", "-"]}
    assert select_runs(RUNS, ["slow", "aaaaaaaa"]) == [RUNS[1], RUNS[0]]
    with pytest.raises(TrackingError, match="zzz"):
        select_runs(RUNS, ["zzz"])
    twins = [fake_run("c" * 10, "same", {}, {}), fake_run("d" * 10, "same", {}, {})]
    assert run_labels(twins) == ["same#cccccc", "same#dddddd"]


def test_comparison_data_and_formats():
    data, curves = build_comparison(FakeClient(RUNS), RUNS)
    assert set(data["metrics"]) == {"train/loss", "train/samples_per_s"}  # system/ left out by default
    loss = data["metrics"]["train/loss"]
    assert (
        loss["best"] == "min" and loss["runs"]["fast"]["best"] == 0.3 and loss["runs"]["fast"]["final"] == 0.4
    )
    assert data["metrics"]["train/samples_per_s"]["runs"]["fast"]["mean"] == 20.0
    assert data["metrics"]["train/samples_per_s"]["runs"]["slow"] == {}
    assert curves["train/loss"]["slow"] == [(0, 1.0), (1, 0.9)]

    rows = compare_rows(data)
    assert rows[0] == ["", "fast", "slow"]
    assert ["param lr", "0.001", "0.0001"] in rows
    assert ["train/loss best (min)", "0.3", "0.9"] in rows
    assert ["train/samples_per_s final", "20", "-"] in rows
    assert ["duration", "1m30s", "1m30s"] in rows

    table = render(rows, data, "table").splitlines()
    assert table[1].startswith("---") and len({line.index("fast") for line in table[:1]}) == 1
    assert list(csv.reader(io.StringIO(render(rows, data, "csv")))) == rows
    markdown = render(rows, data, "markdown").splitlines()
    assert markdown[0] == "|  | fast | slow |" and markdown[1] == "|---|---|---|"
    assert json.loads(render(rows, data, "json"))["differing_params"]["lr"] == {
        "fast": "0.001",
        "slow": "0.0001",
    }
    with pytest.raises(ValueError, match="format"):
        render(rows, data, "xml")


def test_chosen_metrics_keep_throughput_and_unknown_ones_fail():
    data, _ = build_comparison(FakeClient(RUNS), RUNS, metrics=["train/loss"])
    assert list(data["metrics"]) == ["train/loss", "train/samples_per_s"]
    with pytest.raises(TrackingError, match="val/fvd"):
        build_comparison(FakeClient(RUNS), RUNS, metrics=["val/fvd"])


def test_list_rows_are_compact_by_default_and_columns_choose():
    data = build_list(RUNS)
    rows = list_rows(data)
    assert rows[0] == ["run_id", "name", "status", "start", "duration", "recipe", "steps", "loss"]
    assert rows[1] == ["aaaaaaaa", "fast", "FINISHED", rows[1][3], "1m30s", "-", "2", "0.4"]
    assert rows[2][:3] == ["bbbbbbbb", "slow", "RUNNING"] and rows[2][-2:] == ["1", "0.9"]
    chosen = list_rows(build_list(RUNS, columns=["name", "width", "train/samples_per_s"], params=["lr"]))
    assert chosen == [["name", "width", "train/samples_per_s", "lr"], ["fast", "64", "20", "0.001"],
                      ["slow", "64", "-", "0.0001"]]
    with pytest.raises(TrackingError, match="nope"):
        build_list(RUNS, columns=["name", "nope"])


def test_a_table_too_wide_for_the_terminal_cuts_names_then_leaves_columns_out():
    rows = [["run_id", "name", "start", "loss"], ["aaaaaaaa", "a-very-long-run-name-indeed", "2026-01-01 10:00", "0.4"]]
    cut, dropped = fit_width(rows, 50)
    assert dropped == [] and cut[1][1] == "a-very-long-run~" and max(map(len, render(cut, {}, "table").splitlines())) == 50
    cut, dropped = fit_width(rows, 24)
    assert dropped == ["start"] and cut[0] == ["run_id", "name", "loss"] and cut[1][1] == "a-ver~"


EVAL_RUNS = [
    fake_run("e" * 10, "a", {"lr": "1", "eval.protocol": "11111111"},
             {"train/loss": [(5, 0.5)], "eval/fvd": [(5, 300.0), (10, 200.0)], "eval/clip_score": [(10, 25.0)],
              "eval/22222222/fvd": [(10, 150.0)]},
             tags={"eval.protocol.11111111": json.dumps({"num_videos": 64, "frames": 16, "height": 64, "width": 64,
                                                          "fps": 8.0, "seeds": "0..63", "prompts": "x", "num_prompts": 4,
                                                          "steps": 30, "guidance": 3.0, "shift": 1.0, "solver": "euler",
                                                          "sequential": False})}),
    fake_run("f" * 10, "b", {"lr": "2", "eval.protocol": "22222222"},
             {"train/loss": [(5, 0.4)], "eval/fvd": [(10, 100.0)]}),
]


def test_eval_metrics_are_grouped_by_protocol_never_mixed():
    data, curves = build_comparison(FakeClient(EVAL_RUNS), EVAL_RUNS)
    assert set(data["eval"]) == {"eval/fvd [11111111]", "eval/fvd [22222222]", "eval/clip_score [11111111]"}
    first = data["eval"]["eval/fvd [11111111]"]
    assert first["best"] == "min" and first["runs"]["a"]["best"] == 200.0 and first["runs"]["b"] == {}
    assert first["protocol_summary"].startswith("64 videos 16x64x64@8fps")
    # run a's second protocol and run b's first are the same protocol: one row holds both.
    second = data["eval"]["eval/fvd [22222222]"]["runs"]
    assert second["a"]["final"] == 150.0 and second["b"]["final"] == 100.0
    assert data["eval"]["eval/clip_score [11111111]"]["best"] == "max"
    assert "eval/fvd" not in data["metrics"] and list(data["metrics"]) == ["train/loss"]
    assert curves["eval/fvd [11111111]"]["a"] == [(5, 300.0), (10, 200.0)]
    labels = [row[0] for row in compare_rows(data)]
    assert labels.index("param lr") < labels.index("eval/clip_score [11111111] best (max)") < labels.index(
        "train/loss final")
    notes = protocol_notes(data)
    assert notes[0].startswith("[11111111] 64 videos") and notes[1] == "[22222222] (protocol not recorded)"
    listing = list_rows(build_list(EVAL_RUNS))
    assert listing[0][-3:] == ["clip@11111111", "fvd@11111111", "fvd@22222222"]
    assert listing[1][-3:] == ["25", "200", "150"] and listing[2][-3:] == ["-", "-", "100"]
