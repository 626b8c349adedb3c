"""End to end: one training step of PAPOTrainer on padded and on packed micro-batches vs TRL 1.16's GRPOTrainer.

Lengths. The response lengths of RL rollouts are heavy-tailed, and a share of the responses runs into the
long-response cap (``max_completion_length``) and is truncated there: the long tail that rollout systems schedule
around (DARTS, arXiv:2605.30859) and the truncated "overlong" samples that DAPO filters and shapes
(arXiv:2503.14476). ``heavy_tail`` micro-batches draw each completion's length from a log-normal with median
0.35 cap and sigma 0.9 (a factor of about 10 between the 90th and the 10th percentile), truncated at the cap, where
about 12% of them end; prompts are uniform in [P/2, P] tokens. TRL pads a micro-batch to its longest prompt (left)
and completion (right): at B = 16 about half of its positions are padding, the ``pad`` column (per micro-batch).
``full`` micro-batches have every prompt at P and every completion at the cap: no padding.

Model: on a GPU, Qwen2.5-0.5B's configuration (24 layers, D 896, V 151,936, tied embeddings) with random weights,
bf16, SDPA attention, cap 1,024, P 64, 16k completion tokens per device (``tokens`` = B x cap: B = 16); on a CPU, a
small Qwen2 (4 layers, D 256, V 8,192), fp32, cap 256, P 32, B = 16. A step is what a trainer does per micro-batch
after generation: the old policy's log-prob pass without gradients (TRL runs it with vLLM's importance sampling or
``num_iterations > 1``), ``training_step`` (forward, loss, backward) and the AdamW step, on a fixed batch. TRL's
defaults otherwise (DAPO loss, beta 0, gradient checkpointing on).

Methods:
  trl_default  GRPOTrainer: padded; TRL's fused LM head (ChunkedLogProbFunction) + TRL's _compute_loss
  papo_padded  PAPOTrainer(padding_free=False): padded; the fused linear-head loss inside the forward
  papo_packed  PAPOTrainer(padding_free=True): each pass on one packed row (no padded position), the fused loss
               on the packed completions
Where the Triton kernels do not run (a CPU without TRITON_INTERPRET), PAPOTrainer's loss is TRL's own
(``fused_loss`` false in the row): the CPU rows measure packing, not the loss kernels.

Rows record the step time (gpu_ms: GPU time per step on a GPU, median, min and max, see harness.py; on a CPU the
host time of a few steps; wall_ms; ``step_ms``: gpu_ms on a GPU, the fastest of 5 more steps on a CPU, whose cores
other processes may share: one intra-op thread there), the real (unpadded) tokens and ``tokens_per_s`` over
``step_ms``, kernels and host syncs per step, peak memory (``peak_mib``: allocations above what was live before the
step; on a CPU from the profiler's memory timeline), and the first step's loss; ``rel_err_grad`` compares the first
step's gradients (all parameters) with trl_default's: same weights, same batch. Floor: 6 P N flops (P parameters,
N real tokens; attention and recomputation not counted) at the best measured bf16 matmul rate.

Where the time goes: PROFILE_STEPS profiled steps per row (torch.profiler, CPU and CUDA), each kernel's time put
in one of attention (the self_attn modules, forward, recomputation and backward), mlp, lm_head_loss (everything
outside the decoder: the LM head, the loss and the trainer's own work), optimizer (AdamW's step and zero_grad) and
other (embeddings, norms, residuals, gradient accumulation), plus the gaps in which the device did nothing
(``<category>_ms`` with ``_min``, ``_max``; ``profile_samples``). A backward kernel counts where the forward op that
built its autograd node ran (the profiler's sequence numbers). On a CPU the same split covers the host time of the
leaf ops. Needs trl, transformers and datasets.

    python benchmarks/bench_trainer_step.py            # GPU: 16k tokens; CPU: the small model
    python benchmarks/bench_trainer_step.py --quick    # a tiny Qwen2, any device (CI smoke test)
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from harness import Results, arg_parser, device_annotation, floors, on_cuda, rel_err, spread, sync, wanted

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6)  # fmt: skip
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=8192, max_position_embeddings=1024)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256)  # fmt: skip
# (model, (completion tokens per micro-batch (B x cap), lengths) ..., cap, P); the GPU's 4k row has no padding, as
# the earlier measurement where ours was slower at 4k
GPU = (QWEN25_05B, ((4096, "full"), (16384, "full"), (16384, "heavy_tail")), 1024, 64)
CPU = (SMALL, ((4096, "full"), (4096, "heavy_tail")), 256, 32)
QUICK = (TINY, ((64, "heavy_tail"),), 16, 8)
MEDIAN, SIGMA = 0.35, 0.9  # heavy_tail: completion length ~ min(cap, LogNormal(ln(MEDIAN cap), SIGMA))
METHODS = ("trl_default", "papo_padded", "papo_packed")
CPU_STEPS = 5  # the fastest of these is a CPU row's step time
PROFILE_STEPS = 5
CATEGORIES = ("attention", "mlp", "lm_head_loss", "optimizer", "other")
TAG = "papo_bench:"  # the profiler ranges this benchmark opens: TAG + a category, TAG + "body", TAG + "step"


def setting(quick: bool) -> tuple:
    return QUICK if quick else (GPU if on_cuda() else CPU)


def tokenizer():
    """A four-token word-level tokenizer: nothing is generated or decoded, the trainers only need its ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")  # fmt: skip


def model_config(quick: bool):
    from transformers import Qwen2Config

    return Qwen2Config(**setting(quick)[0], tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                       bos_token_id=None, attn_implementation="sdpa")  # fmt: skip


def build_model(config, device: str, dtype: torch.dtype):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


def parameter_count(config) -> int:
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())


def lengths_of(kind: str, B: int, cap: int, prompt: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt lengths, completion lengths)`` of a micro-batch of ``B`` sequences (see the module docstring)."""
    if kind == "full":
        return torch.full((B,), prompt), torch.full((B,), cap)
    completion = torch.exp(math.log(MEDIAN * cap) + SIGMA * torch.randn(B, generator=g, dtype=torch.float64))
    return torch.randint(prompt // 2, prompt + 1, (B,), generator=g), completion.round().clamp(1, cap).long()


def batch(tokens: int, cap: int, prompt: int, vocab: int, kind: str, device: str) -> dict:
    """TRL's micro-batch: prompts left-padded, completions right-padded, each to the longest in the micro-batch."""
    g = torch.Generator(device="cpu").manual_seed(tokens)
    B = tokens // cap
    p_len, c_len = lengths_of(kind, B, cap, prompt, g)
    P, C = int(p_len.max()), int(c_len.max())
    prompt_mask = (torch.arange(P)[None, :] >= P - p_len[:, None]).long()
    completion_mask = (torch.arange(C)[None, :] < c_len[:, None]).long()
    out = {"prompt_ids": torch.randint(3, vocab, (B, P), generator=g) * prompt_mask, "prompt_mask": prompt_mask,
           "completion_ids": torch.randint(3, vocab, (B, C), generator=g) * completion_mask,
           "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
           "num_items_in_batch": completion_mask.sum().float()}  # fmt: skip
    return {k: v.to(device) for k, v in out.items()}


def padding(inputs: dict) -> tuple[int, float]:
    """Real tokens of a micro-batch and the fraction of its ``[B, prompt + completion]`` positions that are padding."""
    masks = (inputs["prompt_mask"], inputs["completion_mask"])
    real = int(sum(m.sum() for m in masks))
    return real, 1.0 - real / sum(m.numel() for m in masks)


def fastest_ms(fn, steps: int) -> float:
    """The fastest of ``steps`` calls, milliseconds (CPU: the one least slowed by other processes)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def cpu_peak_mib(fn) -> float:
    """Peak of the allocations during one call of ``fn`` (the profiler's memory timeline, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max((sum(s) for s in sizes), default=0) / 2**20


def make_step(method: str, inputs: dict, quick: bool, workdir: str):
    """Build the model and trainer; return one step (old-policy log-probs, forward, loss, backward, AdamW step)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from papo_trl import PAPOConfig, PAPOTrainer

    cuda = on_cuda()
    B, T = inputs["completion_ids"].shape
    common = dict(output_dir=workdir, per_device_train_batch_size=B, num_generations=min(B, 8), max_completion_length=T,
                  max_steps=1, learning_rate=1e-6, logging_steps=10**6, report_to="none", save_strategy="no",
                  bf16=cuda, use_cpu=not cuda, loss_type="dapo", beta=0.0, seed=0, disable_tqdm=True,
                  dataloader_num_workers=0)  # fmt: skip
    if method == "trl_default":
        cls, args = GRPOTrainer, GRPOConfig(**common)
    else:
        packed = method == "papo_packed"
        cls, args = PAPOTrainer, PAPOConfig(**common, use_fused_loss=True, advantage_estimator="grpo",
                                            padding_free=packed)  # fmt: skip
    model = build_model(model_config(quick), "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    trainer = cls(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
                  train_dataset=Dataset.from_list([{"prompt": "a"}] * B), processing_class=tokenizer())  # fmt: skip
    if method != "trl_default" and cuda and not trainer._fused_loss:
        raise RuntimeError("PAPOTrainer did not enable the fused loss on this device")
    trainer._prepare_inputs = lambda _batch: inputs  # the generation step, left out of the measure
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
    trainer.model.train()
    optimizer = trainer.create_optimizer()
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)

    first = [True]

    def step():
        with torch.no_grad():  # the old policy's log-probs, as _generate_and_score_completions computes them
            trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, T, batch_size=B)
        loss = trainer.training_step(trainer.model, inputs, inputs["num_items_in_batch"])
        grads = None
        if first.pop() if first else False:  # the first step's gradients, for parity between the paths
            grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, grads

    step.model = trainer.model
    step.fused_loss = getattr(trainer, "_fused_loss", False)
    return step


# ------------------------------------------------------------------------------------- where a step's time goes
@contextlib.contextmanager
def annotated(model):
    """Profiler ranges around the forward of every attention and MLP module and of the decoder (``TAG`` + name);
    a module recomputed under gradient checkpointing opens its range again."""
    from torch.profiler import record_function

    handles = []

    def tag(module, name: str) -> None:
        open_ranges = []

        def enter(*_):
            open_ranges.append(record_function(TAG + name).__enter__())

        def leave(*_):
            open_ranges.pop().__exit__(None, None, None)

        handles.extend([module.register_forward_pre_hook(enter), module.register_forward_hook(leave)])

    tag(model.get_decoder(), "body")
    for name, module in model.named_modules():
        if name.endswith((".self_attn", ".mlp")):
            tag(module, "attention" if name.endswith(".self_attn") else "mlp")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def categorizer(events):
    """``category(cpu_event)``: the innermost of its enclosing ranges (``annotated``'s, AdamW's) that names one; a
    backward op takes the category of the forward op that built its node (same thread and sequence number); ops
    under the decoder's range but no module's are ``other``, backward ops whose forward is unknown too, and the
    rest of the step (the LM head, the loss, the trainer) ``lm_head_loss``."""
    cache: dict[int, str] = {}

    def forward_category(e) -> str:
        node = e
        while node is not None:
            if node.name.startswith(TAG) and node.name != TAG + "step":
                category = node.name[len(TAG) :]
                return "other" if category == "body" else category
            if node.name.startswith("Optimizer."):
                return "optimizer"
            node = node.cpu_parent
        return "lm_head_loss"

    forward = {}  # (thread, sequence number) -> the last forward op that recorded it (the one that built the node)
    for e in sorted((e for e in events if e.sequence_nr >= 0 and e.fwd_thread == 0), key=lambda e: e.time_range.start):
        forward[(e.thread, e.sequence_nr)] = e

    def category(e) -> str:
        if e.id not in cache:
            node, found = e, None
            while node is not None and found is None:
                if node.name.startswith(TAG) or node.name.startswith("Optimizer."):
                    found = forward_category(node)
                elif node.sequence_nr >= 0 and node.fwd_thread > 0:  # a backward op
                    source = forward.get((node.fwd_thread, node.sequence_nr))
                    found = forward_category(source) if source is not None else "other"
                elif node.name.startswith("autograd::engine::evaluate_function"):
                    found = "other"
                node = node.cpu_parent
            cache[e.id] = found or "lm_head_loss"
        return cache[e.id]

    return category


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Milliseconds covered by the ``(start, end)`` microsecond intervals."""
    busy, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start >= end:
            busy += stop - start
        elif stop > end:
            busy += stop - end
        end = stop if end is None else max(end, stop)
    return busy / 1e3


def step_breakdown(events) -> list[dict]:
    """Per profiled step (a ``TAG + "step"`` range): each category's time, the busy time, the window and the gaps
    in it. With CUDA: the device activities (the category of the op that launched each), busy = the union of their
    intervals, window = first start to last end. On a CPU: every op's self time (ranges included: the Python in
    the modules), busy = their sum, window = the step's range."""
    cuda = torch.autograd.DeviceType.CUDA
    cpu = [e for e in events if e.device_type != cuda]
    by_id = {e.id: e for e in cpu}
    category = categorizer(cpu)
    device = [e for e in events if e.device_type == cuda and not device_annotation(e) and not e.name.startswith(TAG)]
    steps = sorted((e.time_range.start, e.time_range.end) for e in cpu if e.name == TAG + "step")
    out = []
    for lo, hi in steps:
        if device:
            launcher = lambda e: by_id.get(e.linked_correlation_id)  # noqa: E731 (the op that launched it)
            mine = [(category(launcher(e)) if launcher(e) else "other", e.time_range.start, e.time_range.end)
                    for e in device if lo <= e.time_range.start <= hi]  # fmt: skip
            busy = union_ms([m[1:] for m in mine])
            window = (max(m[2] for m in mine) - min(m[1] for m in mine)) / 1e3 if mine else 0.0
            times = [(cat, end - start) for cat, start, end in mine]
        else:
            times = [(category(e), e.self_cpu_time_total) for e in cpu
                     if lo <= e.time_range.start <= hi and e.name != TAG + "step"]  # fmt: skip
            busy, window = sum(t for _, t in times) / 1e3, (hi - lo) / 1e3
        row = {f"{c}_ms": sum(t for cat, t in times if cat == c) / 1e3 for c in CATEGORIES}
        out.append({**row, "busy_ms": busy, "window_ms": window, "gaps_ms": window - busy})
    return out


def profile_steps(step, steps: int = PROFILE_STEPS) -> dict:
    """``steps`` profiled steps of ``step`` (its model annotated): median, min and max of each field of
    ``step_breakdown``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda() else [])
    with annotated(step.model), profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(TAG + "step"):
                step()
                sync()
    per_step = step_breakdown(prof.events())
    out = {"profile_samples": len(per_step)}
    for field in per_step[0] if per_step else ():
        out.update({k: v for k, v in spread(field, [s[field] for s in per_step]).items() if not k.endswith("samples")})
    return out


def grad_parity():
    """``check((loss, grads), method)``: keeps trl_default's first-step gradients, compares the others with them."""
    grads = {}

    def check(out, method: str) -> dict:
        loss, first_grads = out
        if method == "trl_default":
            grads[method] = first_grads
            return {"loss": float(loss)}
        ref = grads.get("trl_default")
        return {"loss": float(loss), **({"rel_err_grad": rel_err(first_grads, ref)} if ref is not None else {})}

    return check


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    device = "cuda" if on_cuda() else "cpu"
    if not on_cuda():
        torch.set_num_threads(1)
    fl = floors(args.quick)
    config = model_config(args.quick)
    params = parameter_count(config)
    _, sweep, cap, prompt = setting(args.quick)
    model = "tiny-qwen2" if args.quick else ("qwen2.5-0.5b-config" if on_cuda() else "small-qwen2")
    results = Results("trainer_step", resume=args.resume, floors=fl, parameters=params, model=model,
                      lengths=dict(median=MEDIAN, sigma=SIGMA, cap=cap, prompt=prompt))  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        for tokens, kind in sweep:
            inputs = batch(tokens, cap, prompt, config.vocab_size, kind, device)
            real, pad = padding(inputs)
            check = grad_parity()
            for method in METHODS:
                if not wanted(args, method):
                    continue
                built = {}
                key = dict(method=method, tokens=tokens, lengths=kind, pad=round(pad, 4), seq=cap,
                           dtype="bf16" if on_cuda() else "fp32")  # fmt: skip

                def make(m=method, inputs=inputs, built=built):
                    built["step"] = make_step(m, inputs, args.quick, workdir)
                    return built["step"]

                row = results.run(key, make, check=partial(check, method=method), work=dict(flops=6 * params * real),
                                  extra=profile_steps, limit_s=150)  # fmt: skip
                if row is None or row.get("gpu_ms") is None:
                    continue
                step = built.pop("step")
                row["step_ms"] = row["gpu_ms"] if on_cuda() or args.quick else fastest_ms(step, CPU_STEPS)
                row.update(real_tokens=real, tokens_per_s=real / row["step_ms"] * 1e3, fused_loss=step.fused_loss)
                if not on_cuda() and not args.quick:
                    row["peak_mib"] = cpu_peak_mib(step)
                results.save()
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
