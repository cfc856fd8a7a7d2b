"""Ray job entry point: precompute latents on the cluster this job runs on.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/precompute_latents.py --manifest /data/videos/train.csv --out /data/latents \
        --vae cogvideox --vae-path /data/weights/cogvideox-vae \
        --text-encoder t5 --text-encoder-path /data/weights/t5-v1_1-xxl --num-gpus-per-actor 1

Same flags as `pomvid precompute` (see `python jobs/precompute_latents.py --help`). Inside a Ray job
RAY_ADDRESS names the cluster, so the run joins it; outside one it starts a local Ray.
Exit status: 0 done, 1 some work units unfinished (run again to resume), 2 bad arguments or output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (Ray working dir)

from pipeline.commands.precompute import add_arguments  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="precompute_latents.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)  # parse
    import ray

    from pipeline.commands.precompute import run

    try:
        return run(args)  # build the config, run (joins or starts Ray), print the summary
    finally:
        if ray.is_initialized():  # close
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
