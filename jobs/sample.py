#!/usr/bin/env python
"""The `deepspeed` entry point of `pomvid sample --sp N`: N processes sample each video together, its
frames sharded with sequence parallelism; rank 0 writes the videos.

    deepspeed --num_gpus 4 jobs/sample.py --checkpoint runs/XL --prompt "..." --frames 241 --sp 4 --out long/

`pomvid sample --sp N ...` starts this for you. Every option: `python jobs/sample.py --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.commands.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
