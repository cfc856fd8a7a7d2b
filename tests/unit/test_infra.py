"""The cluster configs stay true: they parse, and everything they name exists and answers --help."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CONFIG_FILES = sorted(
    p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"} or p.name == "Dockerfile"
)
JOB_SCRIPT = re.compile(r"\b(jobs/[\w/]+\.(?:py|sh))\b")
POMVID_COMMAND = re.compile(r"\bpomvid ((?:[a-z]+)(?: [a-z]+)?)")


def _command_lines(path: Path) -> list[str]:
    """Lines that are commands: non-comment lines of configs, indented code lines of READMEs."""
    lines = path.read_text().splitlines()
    if path.name == "README.md":
        return [line for line in lines if line.startswith("    ")]
    return [line for line in lines if not line.lstrip().startswith("#")]


def _named_in_configs(pattern: re.Pattern) -> set[str]:
    found = set()
    for path in CONFIG_FILES + sorted(INFRA.rglob("README.md")):
        for line in _command_lines(path):
            found.update(pattern.findall(line))
    return found


def test_infra_has_every_piece():
    expected = [
        "docker/Dockerfile", "ray/cluster.yaml", "k8s/raycluster.yaml", "k8s/rayjob-precompute.yaml",
        "k8s/rayjob-train.yaml", "mlflow/docker-compose.yaml", "mlflow/k8s.yaml",
        "deepspeed/hostfile.example",
    ]
    missing = [name for name in expected if not (INFRA / name).is_file()]
    assert not missing, f"infra is missing {missing}"
    for folder in ("docker", "ray", "k8s", "mlflow", "deepspeed"):
        assert (INFRA / folder / "README.md").is_file(), f"infra/{folder} has no README.md"


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if p.suffix in {".yaml", ".yml"}], ids=str)
def test_yaml_parses(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path} holds no YAML document"
    for document in documents:
        assert isinstance(document, dict), f"{path}: a document is not a mapping"


def test_every_job_script_named_exists_and_answers_help():
    scripts = _named_in_configs(JOB_SCRIPT)
    assert "jobs/precompute_latents.py" in scripts and "jobs/train_ray.py" in scripts
    for script in sorted(scripts):
        path = ROOT / script
        assert path.is_file(), f"infra names {script}, which does not exist"
        runner = [sys.executable] if script.endswith(".py") else ["bash"]
        result = subprocess.run([*runner, str(path), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 0, f"{script} --help failed: {result.stderr[-2000:]}"
        assert "usage" in result.stdout.lower(), f"{script} --help printed no usage: {result.stdout[:500]}"


def test_every_pomvid_command_named_answers_help():
    commands = _named_in_configs(POMVID_COMMAND)
    assert "submit precompute" in commands
    for command in sorted(commands):
        words = command.split()
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *words, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert result.returncode == 0, f"`pomvid {command} --help` failed: {result.stderr[-2000:]}"


def test_dockerfile_installs_the_way_the_readme_does():
    readme = (ROOT / "README.md").read_text()
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    install_steps = [line.split("RUN", 1)[1].strip() for line in dockerfile.splitlines() if line.startswith("RUN bash run.sh")]
    assert install_steps, "the Dockerfile must install with run.sh, as the README does"
    for step in install_steps:
        assert step in readme, f"the Dockerfile runs `{step}`, which the README does not document"


def test_local_servers_bind_to_loopback():
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"compose service {name} publishes {port} beyond 127.0.0.1"
    cluster = (INFRA / "ray" / "cluster.yaml").read_text()
    assert "--dashboard-host=127.0.0.1" in cluster and "RAY_AUTH_MODE=token" in cluster
    for manifest in ("raycluster.yaml", "rayjob-precompute.yaml", "rayjob-train.yaml"):
        text = (INFRA / "k8s" / manifest).read_text()
        assert "RAY_AUTH_MODE" in text and "LoadBalancer" not in text, manifest


def test_hostfile_example_pairs_with_the_multi_node_script():
    hostfile = (INFRA / "deepspeed" / "hostfile.example").read_text()
    entries = [line.split() for line in hostfile.splitlines() if line.strip() and not line.startswith("#")]
    assert entries and all(len(e) == 2 and e[1].startswith("slots=") for e in entries), hostfile
    script = (ROOT / "jobs" / "launch" / "multi_node.sh").read_text()
    assert "hostfile" in script and "jobs/train.py" in script
    assert shlex.split("deepspeed --hostfile h jobs/train.py")  # the documented shape
