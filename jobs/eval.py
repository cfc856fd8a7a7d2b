#!/usr/bin/env python
"""The `deepspeed` entry point of evaluation: each rank generates and scores its share of the videos.

    deepspeed --num_gpus 8 jobs/eval.py --checkpoint runs/S --prompts prompts.txt --num-videos 2048 \
        --real /data/real_clips --i3d /weights/i3d_pretrained_400.pt --clip-model /weights/clip --out eval/S

`pomvid eval --num_gpus N ...` starts this for you. Every option: `python jobs/eval.py --help` or
docs/eval.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.eval.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
