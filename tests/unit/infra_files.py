"""Readers for the files of infra/ used by tests/unit/test_infra.py: YAML documents, the KubeRay pod
templates and worker groups, the commands the configs and READMEs run (parsed with the code's own
parsers), the Docker build context as Docker computes it from .dockerignore, and a replay of the
Dockerfile's COPY steps."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, vendored by pip
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S_FILES = [*sorted((INFRA / "k8s").glob("*.yaml")), INFRA / "mlflow" / "k8s.yaml"]
# What a developer's checkout holds besides the repository: none of it may reach the image.
JUNK = [".venv/bin/python", ".venv/.pomvid-installed-0123456789abcdef", "venv/bin/python", ".git/HEAD",
        ".git/objects/pack/pack-1.pack", "outputs/demo/run/mlflow.db", "runs/S/checkpoints/step_00000010/ema.safetensors",
        "runs/S/checkpoints/step_00000010/deepspeed/mp_rank_00_model_states.pt", "mlruns/0/meta.yaml",
        "pipeline/__pycache__/cli.cpython-311.pyc", "tests/unit/__pycache__/test_infra.cpython-311.pyc",
        "pomvid.egg-info/PKG-INFO", ".pytest_cache/v/cache/nodeids", ".ruff_cache/0.6/x", "demo.mp4",
        "data/videos/clip.mp4", "latents/shards/unit0000.parquet", "pomvid-compare/pomvid/train_loss.png"]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def mlflow_allows_host(allowed_hosts: list[str], host: str) -> bool:
    """MLflow's own Host-header rule (mlflow/server/security_utils.py), loaded from its file: importing
    mlflow.server would build the whole server app."""
    origin = importlib.util.find_spec("mlflow").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("mlflow_security_utils", Path(origin) / "server" / "security_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.is_allowed_host_header(allowed_hosts, host)


def documents(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"
    return docs


def k8s_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in K8S_FILES for doc in documents(path)]


def pod_templates(doc: dict) -> list[dict]:
    """The pod templates of a RayCluster or RayJob, each as a core v1 PodTemplate object."""
    cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{doc['metadata']['name']}-{name}"},
             "template": group["template"]} for name, group in groups]


@dataclass
class WorkerGroup:
    replicas: int
    gpus: int
    cpus: float


def worker_groups(doc: dict) -> list[WorkerGroup]:
    """The fixed-size worker groups of a RayJob's cluster with each pod's GPU and CPU limits."""
    groups = []
    for group in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], f"{group['groupName']}: fixed size"
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        groups.append(WorkerGroup(group["replicas"], int(limits.get("nvidia.com/gpu", 0)), float(limits["cpu"])))
    return groups


def ray_job_entrypoint(doc: dict, script: str) -> list[str]:
    """The arguments a RayJob's entrypoint gives `python SCRIPT`."""
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[:2] == ["python", script], f"{doc['metadata']['name']}: entrypoint {words[:2]}, expected python {script}"
    return words[2:]


def parse_precompute(args: list[str]) -> argparse.Namespace:
    """`pomvid precompute` / jobs/precompute_latents.py flags, parsed by their own parser."""
    from pipeline.commands.precompute import add_arguments

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(args)


def parse_train(args: list[str]) -> argparse.Namespace:
    """The trainer's flags (jobs/train.py, `pomvid train`, after jobs/train_ray.py's `--`)."""
    from pipeline.train.entry import build_parser

    return build_parser().parse_args(args)


def parse_train_ray(args: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    """jobs/train_ray.py's own flags and the trainer's flags after its `--`."""
    spec = importlib.util.spec_from_file_location("train_ray_job", ROOT / "jobs" / "train_ray.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ray_args = module.build_parser().parse_args(args)
    rest = ray_args.train_args[1:] if ray_args.train_args[:1] == ["--"] else ray_args.train_args
    return ray_args, parse_train(rest)


def _readme_commands(path: Path) -> list[str]:
    """The indented code lines of a Markdown file, continuation lines (ending in \\) joined."""
    found, current = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("    ") and not current:
            continue
        current += line.strip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            found.append(current.strip())
            current = ""
    return found


def commands(*, top_readme: bool = True, include_yaml_args: bool = False) -> list[tuple[Path, str]]:
    """(file, command line): the indented code lines of infra's READMEs (and README.md's), the commands
    in infra/ray/cluster.yaml's header; with include_yaml_args every non-comment line of infra's configs."""
    found = [(ROOT / "README.md", line) for line in _readme_commands(ROOT / "README.md")] if top_readme else []
    for path in sorted(INFRA.rglob("README.md")):
        found += [(path, line) for line in _readme_commands(path)]
    cluster = INFRA / "ray" / "cluster.yaml"
    found += [(cluster, line.lstrip("# ")) for line in cluster.read_text().splitlines() if line.startswith("#   pomvid")]
    if include_yaml_args:
        for path in sorted(p for p in INFRA.rglob("*") if p.suffix == ".yaml" or p.name == "Dockerfile"):
            found += [(path, line) for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return found


def launch_multi_node(command: list[str], tmp_path: Path, extra_env: dict | None = None) -> list[str]:
    """Run jobs/launch/multi_node.sh (or a shell line starting it) with `deepspeed` replaced by echo;
    returns the arguments the real launcher would get. Generated hostfiles land in tmp_path. The
    script's GPU count comes from a stand-in python that answers 0 (no torch import per call): these
    checks are about arguments; tests/integration/test_launch_no_ssh.py runs the script for real."""
    no_gpu = tmp_path / "python-without-gpus"
    no_gpu.write_text("#!/bin/sh\necho 0\n")
    no_gpu.chmod(0o755)
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "DEEPSPEED": "echo",
           "PYTHON": str(no_gpu), "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT), **(extra_env or {})}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return shlex.split(result.stdout.strip().splitlines()[-1])


# ---- Docker ------------------------------------------------------------------------------------------

def build_context(root: Path) -> set[str]:
    """The files `docker build` sends for this checkout (git's files, tracked or new) plus JUNK, less
    what .dockerignore excludes, matched by docker-py's implementation of Docker's rules."""
    from docker.utils.build import PatternMatcher

    lines = (root / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    existing = [f for f in listed if (root / f).is_file()]
    matcher = PatternMatcher(patterns)
    return {f for f in [*existing, *JUNK] if not matcher.matches(f)}


def dockerfile_steps(path: Path = INFRA / "docker" / "Dockerfile") -> list[tuple[str, str]]:
    """(instruction, arguments) per Dockerfile instruction, continuation lines joined."""
    steps, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            op, _, args = current.strip().partition(" ")
            steps.append((op.upper(), args.strip()))
            current = ""
    return steps


def replay_copy(args: str, context: set[str], workdir: Path) -> None:
    """Do what `COPY args` does in WORKDIR `workdir`, from the build context (the forms the Dockerfile uses)."""
    *sources, dest = shlex.split(args)
    assert sources and not any(s.startswith("--") or "*" in s for s in sources), f"COPY {args}: replay it by hand"
    target = workdir / dest
    for source in sources:
        if source == ".":
            for name in context:
                if (ROOT / name).is_file():
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / name, target / name)
            continue
        assert source in context, f"COPY {source}: not in the build context (.dockerignore excludes it?)"
        out = target / Path(source).name if dest.endswith("/") or len(sources) > 1 else target
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / source, out)
