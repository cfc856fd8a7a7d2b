"""The `pomvid` command: help, version, every subcommand's help, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import __version__
from pipeline.cli import COMMANDS, main


def pomvid(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_version_and_help():
    result = pomvid("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pomvid {__version__}"
    result = pomvid("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout, f"`pomvid --help` does not list {name}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_answers_help(name, capsys):
    # In this process (the entry point itself is run as a program above): a subprocess per command
    # would spend its time importing torch.
    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0, out
    assert out.startswith("usage: pomvid"), out[:200]


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["no-such-command"])
    assert stop.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bench_lists_and_refuses_unknown_names(capsys):
    assert main(["bench", "list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "pom_vs_attention" in listed
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "unknown benchmark 'no_such_benchmark'" in capsys.readouterr().err


def test_submit_without_a_server_says_how_to_start_one(capsys):
    code = main(["submit", "status", "raysubmit_x", "--address", "http://127.0.0.1:9"])
    assert code == 2
    assert "no Ray job server answers at http://127.0.0.1:9" in capsys.readouterr().err
