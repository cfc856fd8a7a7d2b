"""Tags that say where and from what code a run came: git commit and dirty flag, host, versions.

Versions are read from installed package metadata, which does not import the packages: asking for
the deepspeed version must not cost a deepspeed import (seconds, and CUDA probing) in a data job.
"""

from __future__ import annotations

import getpass
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Packages whose versions are tagged as `version.<name>` when installed.
VERSIONED_PACKAGES = ("pomvid", "torch", "deepspeed", "ray", "mlflow")

# The repository that holds this package (…/pipeline/tracking/env.py -> repo root).
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info(repo: str | Path | None = None) -> dict[str, str]:
    """{"git.commit": sha, "git.dirty": "true"/"false"} for the repo holding the code, or {} outside git.

    "Dirty" counts tracked files with uncommitted changes only: untracked outputs (e.g. an `outputs/`
    folder inside the checkout) do not make the code differ from the commit.
    """
    cwd = Path(repo) if repo is not None else _PACKAGE_ROOT
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return {}
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    info = {"git.commit": commit, "mlflow.source.git.commit": commit}
    if status is not None:
        info["git.dirty"] = "true" if status else "false"
    branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], cwd)
    if branch and branch != "HEAD":
        info["git.branch"] = branch
    return info


def package_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str]:
    """{"version.<name>": version} for each installed package among `names` (missing ones are skipped)."""
    versions = {"version.python": platform.python_version()}
    for name in names:
        try:
            versions[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    # CUDA only when torch is already imported (the trainer): importing it here would be the heavy
    # import this module avoids.
    torch = sys.modules.get("torch")
    cuda = getattr(getattr(torch, "version", None), "cuda", None)
    if cuda:
        versions["version.cuda"] = str(cuda)
    return versions


def environment_tags(repo: str | Path | None = None) -> dict[str, str]:
    """All environment tags of a run: git, host, versions, command line."""
    tags = {
        "host": socket.gethostname(),
        "command": " ".join(sys.argv)[:2000],
        # MLflow's own tags, shown in the UI's run table.
        "mlflow.source.name": sys.argv[0] if sys.argv and sys.argv[0] else "python",
        "mlflow.source.type": "LOCAL",
    }
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    tags.update(git_info(repo))
    tags.update(package_versions())
    return tags
