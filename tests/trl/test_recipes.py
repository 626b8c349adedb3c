"""The 8 x H100 accelerate recipes in ``examples/accelerate/`` are read the way ``accelerate launch`` reads them and
checked without launching anything: accelerate's own config class and launch-environment code accept them, the
FSDP2 / DeepSpeed plugins build from that environment with the intended settings, the batch arithmetic of the
training recipe holds for their process count, and the README launches each one on GPUs that its vLLM and judge
servers leave free.

What is checked is the recipe, not what this machine makes of it: the training GPUs are the recipe's ``gpu_ids`` as
``accelerate launch`` parses them (on a CPU-only torch, accelerate sets no visible-devices variable), and whether
accelerate's default port is free here changes nothing that is checked."""

import json
import os
import re
import warnings
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "examples" / "accelerate"
CONFIGS = ("zero3_vllm_server", "zero3_vllm_colocate", "fsdp2_vllm_server", "fsdp2_vllm_colocate")
TRAINING = ("papo_qwen2.5_7b.yaml", "dapo_papo_qwen2.5_7b.yaml")


def launch_env(name: str, port_in_use: bool = False) -> tuple[object, dict[str, str]]:
    """The launch arguments and the environment ``accelerate launch --config_file <name>`` gives each process, with
    accelerate's default port taken or free as ``port_in_use`` says (not as this machine happens to have it)."""
    argv = ["--config_file", str(RECIPES / f"{name}.yaml"), "-m", "papo_trl.cli", "--config", "x.yaml"]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    with mock.patch("accelerate.utils.launch.is_port_in_use", return_value=port_in_use), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # accelerate warns that it will look for another port
        if args.use_deepspeed:  # as `launch_command` does before `deepspeed_launcher`
            fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            return args, prepare_deepspeed_cmd_env(args)[1]
        return args, prepare_multi_gpu_env(args)


def gpus(text: str) -> set[int]:
    return {int(g) for g in text.split(",")}


def train_gpus(name: str) -> set[int]:
    """The GPUs the recipe's training processes run on: its ``gpu_ids``, as ``accelerate launch`` parses them."""
    args, _ = launch_env(name)
    return gpus(args.gpu_ids)


@pytest.mark.parametrize("name", CONFIGS)
def test_recipe_is_an_accelerate_config_for_one_8_gpu_node(name):
    config = load_config_from_file(str(RECIPES / f"{name}.yaml"))  # rejects unknown keys
    assert config.num_machines == 1 and config.num_processes == 4 and not config.use_cpu
    training = train_gpus(name)
    assert len(training) == config.num_processes and training <= set(range(8))
    assert training == (set(range(4)) if name.endswith("colocate") else set(range(4, 8)))


@pytest.mark.parametrize("name", CONFIGS)
def test_launch_environment_does_not_depend_on_the_free_ports(name):
    (free_args, free), (busy_args, busy) = launch_env(name), launch_env(name, port_in_use=True)
    assert free == busy and free_args.gpu_ids == busy_args.gpu_ids and free_args.num_processes == 4


@pytest.mark.parametrize("name", [c for c in CONFIGS if c.startswith("fsdp2")])
def test_fsdp2_recipe_builds_a_full_sharding_plugin(name):
    _, env = launch_env(name)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and type(plugin.cpu_offload).__name__ == "OffloadPolicy"
    # transformers refuses FSDP activation checkpointing together with the recipes' gradient_checkpointing
    assert not plugin.activation_checkpointing


@pytest.mark.parametrize("name", [c for c in CONFIGS if c.startswith("zero3")])
def test_zero3_recipe_builds_a_stage_3_plugin_from_its_json(name):
    _, env = launch_env(name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    config_file = ROOT / env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]  # relative to the root, where launches run
    assert config_file.is_file()
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()  # raises if the YAML repeats what the JSON decides (e.g. mixed_precision)
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    raw = json.loads(config_file.read_text())  # batch sizes, clipping and precision come from the training args
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert raw[key] == "auto"
    assert raw["gradient_clipping"] == "auto"
    assert raw["bf16"] == {"enabled": "auto"}


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("name", CONFIGS)
def test_training_recipe_fits_the_process_count(name, training):
    recipe = yaml.safe_load((ROOT / "examples" / training).read_text())
    processes = load_config_from_file(str(RECIPES / f"{name}.yaml")).num_processes
    completions = recipe["per_device_train_batch_size"] * processes * recipe["gradient_accumulation_steps"]
    assert completions == 1024 and completions % recipe["num_generations"] == 0  # 128 prompts x 8 per step
    assert recipe["bf16"] is True and recipe["gradient_checkpointing"] is True


def test_readme_launches_every_recipe_on_gpus_its_servers_leave_free():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("#### Sharded training", 1)[1].split("\n## ", 1)[0]
    launched = {}
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        servers = set()
        for line in re.findall(r"CUDA_VISIBLE_DEVICES=([\d,]+) (?:trl vllm-serve|vllm serve)", block):
            assert not servers & gpus(line), "two servers share a GPU"
            servers |= gpus(line)
        for name in re.findall(r"accelerate launch --config_file examples/accelerate/(\w+)\.yaml", block):
            assert not servers & train_gpus(name), name
            launched[name] = block
    assert set(launched) == set(CONFIGS)
    for name, block in launched.items():
        assert ("--vllm_mode colocate" in block) == name.endswith("colocate")
