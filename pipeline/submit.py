"""Submit pomvid jobs to a Ray cluster through Ray's job server, and follow them.

A thin layer over `ray.job_submission.JobSubmissionClient` that adds what users of this project need:
the entry point for each job kind, the working directory upload with outputs and environments left
out, Ray's token authentication (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, a token file or
~/.ray/auth_token) and errors that say how to fix a missing or wrong token.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}

# What each job kind runs on the cluster, relative to the uploaded working directory.
ENTRYPOINTS = {
    "precompute": "python jobs/precompute_latents.py",
    "train": "python jobs/train_ray.py",
}

# Never upload these: environments, outputs, caches and media (Ray caps the upload at 500 MiB).
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "outputs", "runs", "mlruns", "checkpoints", "latents", ".offline-wheels",
    "__pycache__", ".pytest_cache", ".ruff_cache", "*.mp4", "*.gif", "*.webm", "*.avi", "*.mkv", "*.db",
]

TOKEN_HELP = (
    "This Ray cluster requires an authentication token. Provide it with one of: "
    "`export RAY_AUTH_TOKEN=<token>`, `--token-file PATH`, or the file ~/.ray/auth_token "
    "(on the head node `ray get-auth-token` prints it), together with `export RAY_AUTH_MODE=token`."
)


class SubmitError(RuntimeError):
    """A job could not be submitted, found or followed; the message says what to do."""


@dataclass(kw_only=True)
class JobRequest:
    kind: str
    """Which job to run: a key of ENTRYPOINTS."""
    args: list[str] = field(default_factory=list)
    """Arguments passed to the job's entry point unchanged."""
    working_dir: str = "."
    """The project folder uploaded to the cluster (the repository root)."""
    submission_id: str | None = None
    """A stable id makes resubmission idempotent to find; Ray refuses a duplicate live id."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the job."""
    pip: list[str] = field(default_factory=list)
    """Extra pip packages for the job's runtime environment (most clusters bake them into the image)."""

    def __post_init__(self) -> None:
        if self.kind not in ENTRYPOINTS:
            raise SubmitError(f"job kind {self.kind!r} is unknown; use one of {sorted(ENTRYPOINTS)}")
        if not (Path(self.working_dir) / "jobs").is_dir():
            raise SubmitError(
                f"working_dir {self.working_dir!r} has no jobs/ folder: run from the pomvid repository root "
                "or pass --working-dir"
            )

    def entrypoint(self) -> str:
        return " ".join([ENTRYPOINTS[self.kind], *map(shlex.quote, self.args)])

    def runtime_env(self) -> dict:
        env = {"working_dir": self.working_dir, "excludes": list(WORKING_DIR_EXCLUDES)}
        if self.env:
            env["env_vars"] = dict(self.env)
        if self.pip:
            env["pip"] = list(self.pip)
        return env


def configure_token(token_file: str | None = None) -> bool:
    """Turn on Ray's token authentication for this process when a token is available.

    Returns whether a token is in use. RAY_AUTH_MODE=token without any token is left to fail with
    TOKEN_HELP at the first request.
    """
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise SubmitError(f"--token-file {token_file} does not exist. {TOKEN_HELP}")
        os.environ["RAY_AUTH_TOKEN"] = path.read_text().strip()
    default_file = Path("~/.ray/auth_token").expanduser()
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN")) or default_file.is_file()
    if has_token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
    return has_token and os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def resolve_address(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _explain(error: Exception, address: str) -> SubmitError:
    text = str(error)
    if "401" in text or "403" in text or "uthenticat" in text or "Unauthorized" in text:
        return SubmitError(f"Ray at {address} refused the request: {text.strip()[:300]}\n{TOKEN_HELP}")
    if "Failed to connect" in text or "Connection refused" in text or "Cannot connect" in text:
        return SubmitError(
            f"no Ray job server answers at {address}: start the cluster (`ray start --head "
            "--dashboard-host 127.0.0.1`) or pass --address http://HEAD:8265 / set RAY_ADDRESS"
        )
    return SubmitError(f"Ray at {address}: {text.strip()[:500]}")


class JobClient:
    """Submits, follows, inspects and stops pomvid jobs on one Ray cluster."""

    def __init__(self, address: str | None = None, token_file: str | None = None):
        self.address = resolve_address(address)
        configure_token(token_file)
        from ray.job_submission import JobSubmissionClient

        try:
            self._client = JobSubmissionClient(self.address)
        except Exception as error:  # Ray raises plain exceptions for connection and auth failures
            raise _explain(error, self.address) from error

    def submit(self, request: JobRequest) -> str:
        try:
            return self._client.submit_job(
                entrypoint=request.entrypoint(),
                runtime_env=request.runtime_env(),
                submission_id=request.submission_id,
                metadata={"pomvid_kind": request.kind},
            )
        except Exception as error:
            raise _explain(error, self.address) from error

    def status(self, job_id: str) -> str:
        try:
            return str(self._client.get_job_status(job_id).value)
        except Exception as error:
            raise _explain(error, self.address) from error

    def info(self, job_id: str):
        try:
            return self._client.get_job_info(job_id)
        except Exception as error:
            raise _explain(error, self.address) from error

    def stop(self, job_id: str) -> bool:
        try:
            return bool(self._client.stop_job(job_id))
        except Exception as error:
            raise _explain(error, self.address) from error

    def logs(self, job_id: str) -> str:
        try:
            return self._client.get_job_logs(job_id)
        except Exception as error:
            raise _explain(error, self.address) from error

    def follow(self, job_id: str, out=sys.stdout, poll_s: float = 1.0) -> str:
        """Stream the job's logs until it ends; return its final status."""

        async def tail() -> None:
            async for lines in self._client.tail_job_logs(job_id):
                out.write(lines)
                out.flush()

        try:
            asyncio.run(tail())
        except Exception as error:  # the log stream can drop; the status below is what counts
            out.write(f"[pomvid] log stream ended early ({error}); polling the job status\n")
        while (state := self.status(job_id)) not in TERMINAL_STATES:
            time.sleep(poll_s)
        return state


def exit_code_for(state: str) -> int:
    return 0 if state == "SUCCEEDED" else 1
