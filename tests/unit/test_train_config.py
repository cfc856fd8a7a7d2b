"""Run config, recipes, --set overrides, the dp x sp layout and the DeepSpeed config built from them."""

from __future__ import annotations

import json

import pytest

from pipeline.config import RECIPES, ConfigError, RunConfig, get_recipe
from pipeline.config_overrides import apply_overrides, config_from_dict, config_to_dict
from pipeline.train.deepspeed_config import (
    WarmupCosine,
    build_deepspeed_config,
    check_batch_keys,
    deep_merge,
    load_user_deepspeed_config,
)


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_are_full_valid_configs_that_round_trip(name):
    config = get_recipe(name)
    assert isinstance(config, RunConfig) and config.recipe == name
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_gpu_recipes_scale_up():
    widths = [get_recipe(n).model.width for n in ("S", "B", "XL")]
    assert widths == sorted(widths) and get_recipe("XL").engine.activation_checkpointing
    assert get_recipe("debug").engine.precision == "fp32" and get_recipe("S").engine.precision == "bf16"


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'L'; choose one of debug, S, B, XL"):
        get_recipe("L")


def test_overrides_parse_by_field_type():
    config = apply_overrides(get_recipe("debug"), [
        "optim.lr=3e-4", "optim.betas=0.9,0.95", "engine.zero_stage=3", "engine.offload_optimizer=true",
        "model.depth=3", "validation.prompts=a red ball, rolling|a blue cube", "data.path=/data/x", "flow.caption_dropout=0",
    ])
    assert config.optim.lr == 3e-4 and config.optim.betas == (0.9, 0.95)
    assert config.engine.zero_stage == 3 and config.engine.offload_optimizer is True
    assert config.model.depth == 3 and config.data.path == "/data/x" and config.flow.caption_dropout == 0.0
    assert config.validation.prompts == ["a red ball, rolling", "a blue cube"]
    assert apply_overrides(config, ['validation.prompts=["x|y", "z"]']).validation.prompts == ["x|y", "z"]


@pytest.mark.parametrize("override, message", [
    ("optim.lrate=1", "OptimConfig has no field 'lrate'; its fields are lr, betas"),
    ("nosection.x=1", "RunConfig has no field 'nosection'"),
    ("optim.lr=fast", "cannot read 'fast' as float"),
    ("engine.offload_optimizer=maybe", "cannot read 'maybe' as bool"),
    ("engine.zero_stage=0", "EngineConfig.zero_stage=0 must be 1, 2 or 3"),
    ("model.width=33", "DiTConfig.width=33 must be even"),
    ("optim=1", "optim is a section"),
    ("optim.lr", "expected FIELD.PATH=VALUE"),
    ("data.global_batch_size=5", "not a multiple of micro_batch_size=2"),
    ("flow.clean_prefix_prob=0.5", "needs per_frame_timesteps=true"),
    ("train.stop_at=99", "stop_at=99 is past steps=20"),
])
def test_bad_overrides_name_the_field_and_value(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(get_recipe("debug"), [override])


def test_layout_checks_world_size_and_batch_split():
    config = apply_overrides(get_recipe("debug"), ["data.global_batch_size=8", "data.micro_batch_size=2"])
    layout = config.layout(4)
    assert (layout.dp, layout.sp, layout.grad_accum, layout.per_rank_batch) == (4, 1, 1, 2)
    layout = apply_overrides(config, ["parallel.sp=2"]).layout(4)
    assert (layout.dp, layout.sp, layout.grad_accum) == (2, 2, 2)
    with pytest.raises(ConfigError, match="sp=3 does not divide the world size 4"):
        apply_overrides(config, ["parallel.sp=3"]).layout(4)
    with pytest.raises(ConfigError, match=r"dp=3 x sp=1 = 3 does not match the world size 4"):
        apply_overrides(config, ["parallel.dp=3"]).layout(4)
    with pytest.raises(ConfigError, match="global_batch_size=8 is not a multiple of micro_batch_size=2 x dp=8"):
        config.layout(8)


def test_deepspeed_config_follows_the_dataclasses():
    config = apply_overrides(get_recipe("debug"), ["data.global_batch_size=16", "data.micro_batch_size=2",
                                                   "parallel.sp=2", "engine.zero_stage=3", "optim.grad_clip=0.5",
                                                   "engine.precision=auto"])
    layout = config.layout(4)  # dp=2 x sp=2, grad_accum 4
    ds = build_deepspeed_config(config, layout, device_type="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    # DeepSpeed counts all 4 ranks as replicas: its batch is our global batch x sp.
    assert ds["train_batch_size"] == 2 * 4 * 4 == config.data.global_batch_size * 2
    assert ds["zero_optimization"] == {"stage": 3} and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["optimizer"]["params"]["torch_adam"] is True
    gpu = build_deepspeed_config(config, layout, device_type="cuda")
    assert gpu["bf16"]["enabled"] is True
    # bf16 weights, fp32 gradient reduction and accumulation (engine.grad_dtype's default); fp32 runs leave
    # DeepSpeed's (fp32) defaults.
    assert gpu["communication_data_type"] == "fp32" and gpu["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "communication_data_type" not in ds and "data_types" not in ds
    low = build_deepspeed_config(apply_overrides(config, ["engine.grad_dtype=bfloat16"]), layout, device_type="cuda")
    assert low["communication_data_type"] == "bf16" and low["data_types"] == {"grad_accum_dtype": "bf16"}
    with pytest.raises(ConfigError, match="grad_dtype='fp16' is unknown"):
        apply_overrides(config, ["engine.grad_dtype=fp16"])
    offload = build_deepspeed_config(apply_overrides(config, ["engine.offload_optimizer=true"]), layout,
                                     device_type="cuda")
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in offload["optimizer"]["params"]
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed's own check of the batch arithmetic (without a process group it sees a world of 1).
    one = apply_overrides(config, ["parallel.sp=1"])
    single = build_deepspeed_config(one, one.layout(1), device_type="cpu")
    DeepSpeedConfig(single)
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        DeepSpeedConfig({**single, "train_batch_size": 3})


def test_user_json_overrides_key_by_key(tmp_path):
    ours = {"zero_optimization": {"stage": 2, "overlap_comm": False}, "gradient_clipping": 1.0, "bf16": {"enabled": True}}
    theirs = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e8}, "gradient_clipping": 0.3}
    merged = deep_merge(ours, theirs)
    assert merged == {"zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e8},
                      "gradient_clipping": 0.3, "bf16": {"enabled": True}}
    assert ours["zero_optimization"]["overlap_comm"] is False  # not modified in place
    path = tmp_path / "ds.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_user_deepspeed_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_user_deepspeed_config(tmp_path / "missing.json")
    layout = get_recipe("debug").layout(2)
    with pytest.raises(ConfigError, match="sets train_batch_size=64"):
        check_batch_keys({"train_batch_size": 64}, layout)
    check_batch_keys({"train_batch_size": 4, "zero_optimization": {"stage": 1}}, layout)


def test_warmup_then_cosine():
    schedule = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0) and schedule(19) == pytest.approx(0.1) and schedule(50) == pytest.approx(0.1)
    values = [schedule(s) for s in range(4, 20)]
    assert values == sorted(values, reverse=True)
    assert WarmupCosine(warmup=0, total=10, min_ratio=0.0)(0) == 1.0
    assert WarmupCosine(warmup=2, total=10, min_ratio=0.0, decay="constant")(9) == 1.0


def test_resumed_schedule_keeps_the_step_and_takes_the_new_config():
    import torch

    from pipeline.train.deepspeed_config import lr_scheduler_factory, make_schedule, reapply_schedule

    config = apply_overrides(get_recipe("debug"), ["train.steps=10", "optim.warmup_steps=2"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.optim.lr)
    scheduler = lr_scheduler_factory(config)(optimizer)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    longer = apply_overrides(config, ["train.steps=40", "optim.lr=2e-3"])
    optimizer2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=longer.optim.lr)
    resumed = lr_scheduler_factory(longer)(optimizer2)
    resumed.load_state_dict(state)  # carries the old schedule's fields, as DeepSpeed's load does
    reapply_schedule(resumed, optimizer2, longer)
    assert resumed.last_epoch == 5
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(2e-3 * make_schedule(longer)(5))
    reapply_schedule(scheduler, optimizer, config)  # nothing changed: nothing moves
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * make_schedule(config)(5))


@pytest.mark.parametrize("name", ["S", "B", "XL", "demo"])
def test_recipe_docstrings_state_the_sizes_the_code_builds(name):
    import re

    import torch

    from pipeline.models.dit import PoMDiT

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = PoMDiT(get_recipe(name).model)
    built = sum(p.numel() for p in model.parameters()) / 1e6
    stated = float(re.search(r"(\d+(?:\.\d+)?)M[ -]param", RECIPES[name].__doc__).group(1))
    assert stated == round(built, 1 if built < 10 else 0), f"{name}: docstring says {stated}M, the model has {built:.2f}M"


def test_causal_training_needs_per_frame_timesteps_unless_opted_out():
    with pytest.raises(ConfigError, match="model.causal=true .* set flow.per_frame_timesteps=true"):
        apply_overrides(get_recipe("debug"), ["model.causal=true"]).check_training()
    diffusion_forcing = apply_overrides(get_recipe("debug"), ["model.causal=true", "flow.per_frame_timesteps=true"])
    diffusion_forcing.check_training()
    opted_out = apply_overrides(get_recipe("debug"), ["model.causal=true", "flow.causal_per_sample_timesteps=true"])
    opted_out.check_training()
    assert not opted_out.flow.per_frame_timesteps
