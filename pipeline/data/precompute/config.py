"""PrecomputeConfig: everything one latent precomputation run needs, checked before Ray starts."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from pipeline.data.decode.buckets import BucketTable, parse_buckets
from pipeline.storage import is_remote

VAE_KINDS = ("cogvideox", "frame_kl", "pixel")
TEXT_KINDS = ("t5", "clip")
DECODE_BACKENDS = ("auto", "decord", "pyav")
STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # = pipeline.data.shards.STORAGE_DTYPES (no torch import here)


@dataclass(kw_only=True)
class PrecomputeConfig:
    """One `pomvid precompute` run. Fields that change the numbers are recorded in manifest.json."""

    manifest: str
    """A manifest (.csv, .jsonl, .parquet) with video and caption columns, or a folder of videos with
    same-named .txt captions."""
    output: str
    """Output folder (shards/, errors/, manifest.json). Must be on a filesystem every Ray node sees."""
    buckets: str = "17x256x256"
    """Bucket table "FRAMESxHEIGHTxWIDTH,...": each video goes to the nearest aspect ratio it can fill."""
    fps: float = 8.0
    """Frame rate clips are sampled at."""
    clips_per_video: int = 1
    """At most this many non-overlapping clips per video (spread over its length)."""
    video_column: str = "video"
    """Manifest column holding the video path (relative paths resolve against the manifest's folder)."""
    caption_column: str = "caption"
    """Manifest column holding the caption."""
    start_column: str = "start"
    """Optional manifest column: usable footage starts here (seconds)."""
    end_column: str = "end"
    """Optional manifest column: usable footage ends here (seconds)."""
    decode_backend: str = "auto"
    """"auto" (decord, then PyAV), "decord" or "pyav"."""
    vae: str = "cogvideox"
    """VAE kind: "cogvideox", "frame_kl" or "pixel"."""
    vae_path: str | None = None
    """Local folder or hub id of pretrained VAE weights (not needed for "pixel")."""
    vae_config: dict | None = None
    """Model kwargs for a VAE with random weights drawn from `vae_seed` (tests); excludes vae_path."""
    vae_seed: int = 0
    """Seed of the random weights when `vae_config` is given."""
    vae_dtype: str | None = None
    """VAE compute dtype; None: bfloat16 on GPU actors, float32 on CPU."""
    text_encoder: str = "t5"
    """Text encoder kind: "t5" or "clip"."""
    text_encoder_path: str | None = None
    """Local folder or hub id of the text encoder (for "clip" also an open_clip local-dir)."""
    text_encoder_config: dict | None = None
    """open_clip model config for a CLIP text tower with random weights (tests); excludes the path."""
    text_max_length: int | None = None
    """Token length of the text encoder; None: the encoder's default (226 for T5, the context for CLIP)."""
    text_dtype: str | None = None
    """Text encoder compute dtype; None: bfloat16 on GPU actors, float32 on CPU."""
    storage_dtype: str = "float16"
    """dtype of latents and text embeddings in the shards: float32, float16 or bfloat16."""
    rows_per_work_unit: int = 16
    """Manifest rows per work unit (= per shard); also the most clips one VAE actor call sees."""
    vae_batch_size: int = 4
    """Clips per VAE forward pass."""
    text_batch_size: int = 32
    """Captions per text-encoder forward pass."""
    decode_concurrency: int | None = None
    """Most decode tasks at once; None: as many as the CPUs allow."""
    decode_timeout: float = 120.0
    """Seconds one video may take to probe and decode; a slower one (a hung read) is recorded with
    reason "timeout" and skipped, and the job goes on."""
    decode_num_cpus: float = 1.0
    """CPUs each decode task reserves."""
    vae_concurrency: int = 1
    """VAE actors (each loads the VAE once)."""
    num_gpus_per_actor: float = 0.0
    """GPUs per VAE actor (fractions share a GPU); 0: the VAE runs on CPU."""
    vae_num_cpus: float = 1.0
    """CPUs each VAE actor reserves."""
    text_concurrency: int = 1
    """Text-encoder actors."""
    text_num_gpus_per_actor: float | None = None
    """GPUs per text actor; None: the same as num_gpus_per_actor."""
    text_num_cpus: float = 1.0
    """CPUs each text actor reserves."""
    task_retries: int = 3
    """Times a decode or write task is run again when its worker process dies (a preempted node, an
    out-of-memory kill); its unit is redone, never written twice."""
    actor_restarts: int = 3
    """Times an encoder actor is restarted when its process dies; the unit it held is redone."""
    write_num_cpus: float = 0.25
    """CPUs each shard-writing task reserves (writing is mostly I/O)."""
    validation_prompts: str | None = None
    """Text file, one prompt per line: their embeddings are stored in text_conditioning.safetensors
    beside the null caption's (always stored), for validation samples without a text encoder."""
    plan_only: bool = False
    """Only plan: read the manifest, make the work units, find the finished ones, print the counts;
    nothing is decoded, no encoder loaded, no Ray started."""
    overwrite: bool = False
    """Delete an existing output made with other encoders, buckets or settings instead of refusing."""
    ray_address: str | None = None
    """Ray cluster to join; None: $RAY_ADDRESS if set (a Ray job), otherwise a local Ray."""
    ray_num_cpus: int | None = None
    """CPUs of the local Ray started when there is no cluster; None: all of this machine's."""
    output_is_shared: bool = False
    """The local output path is a file system every node of the Ray cluster mounts (NFS, Lustre, a
    shared PVC). Without it, a local output on a cluster of several nodes is refused before any work:
    each node would write its shards to its own disk. Not needed for s3:// (or gs://, abfs://) outputs."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.manifest:
            raise ValueError("PrecomputeConfig.manifest is empty: give a manifest file or a video folder")
        # On object storage (s3://...) the manifest is checked by the run's preflight, with the credentials.
        if not is_remote(self.manifest) and not os.path.exists(self.manifest):
            raise ValueError(f"PrecomputeConfig.manifest={self.manifest!r} does not exist: give a manifest "
                             "file (.csv, .jsonl, .parquet) or a folder of videos")
        if not self.output:
            raise ValueError("PrecomputeConfig.output is empty: give the output folder")
        if not is_remote(self.manifest):
            self.manifest = os.path.abspath(self.manifest)
        if not is_remote(self.output):
            self.output = os.path.abspath(self.output)
        try:
            self.bucket_table()
        except ValueError as err:
            raise ValueError(f"PrecomputeConfig.buckets={self.buckets!r}: {err}") from None
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"PrecomputeConfig.fps={self.fps!r}: give a positive frame rate, e.g. 8")
        for name in ("clips_per_video", "rows_per_work_unit", "vae_batch_size", "text_batch_size",
                     "vae_concurrency", "text_concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PrecomputeConfig.{name}={value!r}: must be an integer >= 1")
        if self.decode_concurrency is not None and (not isinstance(self.decode_concurrency, int)
                                                    or self.decode_concurrency < 1):
            raise ValueError(f"PrecomputeConfig.decode_concurrency={self.decode_concurrency!r}: an integer >= 1 or None")
        for name in ("num_gpus_per_actor", "text_num_gpus_per_actor", "decode_num_cpus", "vae_num_cpus",
                     "text_num_cpus", "write_num_cpus"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value >= 0):
                raise ValueError(f"PrecomputeConfig.{name}={value!r}: must be a number >= 0")
        if not (isinstance(self.decode_timeout, int | float) and self.decode_timeout > 0):
            raise ValueError(f"PrecomputeConfig.decode_timeout={self.decode_timeout!r}: give seconds > 0, e.g. 120")
        for name in ("task_retries", "actor_restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PrecomputeConfig.{name}={value!r}: must be an integer >= 0")
        if self.decode_num_cpus <= 0:
            raise ValueError(f"PrecomputeConfig.decode_num_cpus={self.decode_num_cpus!r}: must be > 0")
        if self.decode_backend not in DECODE_BACKENDS:
            raise ValueError(f"PrecomputeConfig.decode_backend={self.decode_backend!r}: use one of {DECODE_BACKENDS}")
        if self.vae not in VAE_KINDS:
            raise ValueError(f"PrecomputeConfig.vae={self.vae!r}: use one of {VAE_KINDS}")
        if self.vae_path is not None and self.vae_config is not None:
            raise ValueError("PrecomputeConfig: give vae_path (pretrained) or vae_config (random weights), not both")
        if self.vae != "pixel" and self.vae_path is None and self.vae_config is None:
            raise ValueError(f"PrecomputeConfig.vae={self.vae!r} needs vae_path (a folder or hub id of its "
                             "weights); use vae='pixel' for the parameter-free codec")
        if self.text_encoder not in TEXT_KINDS:
            raise ValueError(f"PrecomputeConfig.text_encoder={self.text_encoder!r}: use one of {TEXT_KINDS}")
        if self.text_encoder_path is not None and self.text_encoder_config is not None:
            raise ValueError("PrecomputeConfig: give text_encoder_path or text_encoder_config, not both")
        if self.text_encoder_path is None and (self.text_encoder == "t5" or self.text_encoder_config is None):
            raise ValueError(f"PrecomputeConfig.text_encoder={self.text_encoder!r} needs text_encoder_path "
                             "(a folder or hub id)" + ("" if self.text_encoder == "t5" else
                                                      " or text_encoder_config (random weights)"))
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"PrecomputeConfig.storage_dtype={self.storage_dtype!r}: use one of {list(STORAGE_DTYPES)}")
        for name in ("vae_dtype", "text_dtype"):
            value = getattr(self, name)
            if value is not None and value not in STORAGE_DTYPES:
                raise ValueError(f"PrecomputeConfig.{name}={value!r}: use one of {list(STORAGE_DTYPES)} or None")
        if self.validation_prompts is not None:
            if not os.path.isfile(self.validation_prompts):
                raise ValueError(f"PrecomputeConfig.validation_prompts={self.validation_prompts!r} is not a file: "
                                 "give a text file with one prompt per line")
            self.validation_prompts = os.path.abspath(self.validation_prompts)
        if self.text_max_length is not None and (not isinstance(self.text_max_length, int) or self.text_max_length < 1):
            raise ValueError(f"PrecomputeConfig.text_max_length={self.text_max_length!r}: an integer >= 1 or None")

    def read_validation_prompts(self) -> list[str]:
        """The prompts of `validation_prompts`, one per non-blank line (stripped); [] without a file."""
        if self.validation_prompts is None:
            return []
        with open(self.validation_prompts, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]

    def bucket_table(self) -> BucketTable:
        return self.buckets if isinstance(self.buckets, BucketTable) else parse_buckets(self.buckets)

    @property
    def text_gpus(self) -> float:
        return self.num_gpus_per_actor if self.text_num_gpus_per_actor is None else self.text_num_gpus_per_actor

    def vae_build_kwargs(self) -> dict:
        """Keyword arguments of `build_vae` for one actor (device follows the GPUs it was given)."""
        gpu = self.num_gpus_per_actor > 0
        kwargs = {"device": "cuda" if gpu else "cpu",
                  "dtype": self.vae_dtype or ("bfloat16" if gpu else "float32")}
        if self.vae_path is not None:
            kwargs["path"] = self.vae_path
        elif self.vae_config is not None:
            kwargs.update(config=self.vae_config, seed=self.vae_seed)
        return kwargs

    def text_build_kwargs(self) -> dict:
        """Keyword arguments of `build_text_encoder` for one actor."""
        gpu = self.text_gpus > 0
        kwargs = {"device": "cuda" if gpu else "cpu", "max_length": self.text_max_length,
                  "dtype": self.text_dtype or ("bfloat16" if gpu else "float32")}
        if self.text_encoder_path is not None:
            kwargs["path"] = self.text_encoder_path
        else:
            kwargs["config"] = self.text_encoder_config
        return kwargs

    def to_dict(self) -> dict:
        out = asdict(self)
        out["buckets"] = str(self.bucket_table())
        return out


def field_docs() -> dict[str, str]:
    """Field name -> the docstring under it (for command-line help)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(PrecomputeConfig)))
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs
