"""The data room: videos + captions -> latent shards -> training batches, one sub-package per step.

    source/      where the videos are: manifests (CSV, JSONL, Parquet; a file or a folder of part
                 files) or a folder of videos with .txt captions; their rows become work units
    decode/      a video file -> clips: buckets, frame choice, crop and scale (decord, PyAV)
    encode/      clips and captions -> latents and text embeddings: the VAEs, the text encoders,
                 their fingerprints
    store/       what precompute writes: Parquet shards, the index, manifest.json, errors, the text
                 conditioning; every path and atomic write of the output goes through here
    load/        shards -> batches for training: the dataset, the sampling plan, prefetch
    precompute/  the Ray job that runs source -> decode -> encode -> store on a cluster

A step imports only the steps above it in this list, never one below, and no module imports itself
through others (tests/unit/test_data_layout.py checks both, function-level imports included), so each
step reads alone, in order.
"""
