"""`pomvid submit`: send precompute and training jobs to a Ray cluster, follow, inspect, stop them.

    pomvid submit precompute --address http://HEAD:8265 --follow -- --manifest data/train.csv --out latents/
    pomvid submit train --address http://HEAD:8265 --follow -- --data latents/ --recipe S --workers 8
    pomvid submit status JOB_ID
    pomvid submit stop JOB_ID
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="submit precompute/train jobs to a Ray cluster, or ask for a job's status, logs or stop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="submit_action", metavar="ACTION", required=True)
    for kind in ("precompute", "train"):
        job = actions.add_parser(kind, help=f"submit a {kind} job; arguments after -- go to the job")
        _add_connection_flags(job)
        job.add_argument("--follow", action="store_true", help="stream the logs and exit with the job's status")
        job.add_argument("--working-dir", default=".", help="the repository root to upload (default: .)")
        job.add_argument("--submission-id", help="a job id of your choice (default: Ray makes one)")
        job.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the job")
        job.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then the job's own arguments")
        job.set_defaults(func=run_submit, job_kind=kind)
    for action, text in (("status", "print a job's status"), ("stop", "stop a job"), ("logs", "print a job's logs")):
        sub = actions.add_parser(action, help=text)
        _add_connection_flags(sub)
        sub.add_argument("job_id")
        sub.set_defaults(func=run_job_action)


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray job server URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    parser.add_argument("--token-file", help="file holding the Ray auth token (default: $RAY_AUTH_TOKEN or ~/.ray/auth_token)")


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"pomvid submit: --env {pair!r} is not KEY=VALUE")
        env[key] = value
    return env


def run_submit(args) -> int:
    from pipeline.submit import JobClient, JobRequest, SubmitError, exit_code_for

    job_args = args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args
    try:
        request = JobRequest(
            kind=args.job_kind,
            args=job_args,
            working_dir=args.working_dir,
            submission_id=args.submission_id,
            env=_parse_env(args.env),
        )
        client = JobClient(args.address, args.token_file)
        job_id = client.submit(request)
        print(f"submitted {args.job_kind} job {job_id} to {client.address}")
        if not args.follow:
            print(f"follow it with: pomvid submit logs {job_id} --address {client.address}")
            return 0
        state = client.follow(job_id)
        print(f"job {job_id} ended: {state}")
        return exit_code_for(state)
    except SubmitError as error:
        print(f"pomvid submit: {error}", file=sys.stderr)
        return 2


def run_job_action(args) -> int:
    from pipeline.submit import JobClient, SubmitError

    try:
        client = JobClient(args.address, args.token_file)
        if args.submit_action == "status":
            print(client.status(args.job_id))
        elif args.submit_action == "stop":
            print("stopped" if client.stop(args.job_id) else "already finished")
        else:
            print(client.logs(args.job_id), end="")
        return 0
    except SubmitError as error:
        print(f"pomvid submit: {error}", file=sys.stderr)
        return 2
