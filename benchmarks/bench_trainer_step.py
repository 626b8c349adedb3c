"""End to end: one training step of PAPOTrainer's fused linear-head loss vs TRL 1.16's default GRPOTrainer path.

Model: a Qwen2-architecture model with Qwen2.5-0.5B's configuration (24 layers, D 896, V 151,936, tied
embeddings), built from its config with random weights, bf16, SDPA attention. A step is TRL's training_step
(the model's forward, the loss, the backward) plus the AdamW step, on a fixed batch of sequences of 64 prompt and
1,024 completion tokens: 4k and 16k completion tokens per device. Generation is left out: the batch is what
_generate_and_score_completions hands the loss. Both trainers keep TRL's defaults otherwise (DAPO loss, beta 0,
gradient checkpointing on).

Methods:
  papo_fused   PAPOTrainer(use_fused_loss=True): papo_kernels.fused_linear_policy_loss inside the forward
  trl_default  GRPOTrainer: TRL's fused LM head (ChunkedLogProbFunction) + TRL's _compute_loss

Rows record the step's time (gpu_ms from do_bench, wall_ms per step), kernels and host syncs per step, peak memory
above the weights and optimizer state, and the first step's loss; papo_fused's rel_err_grad compares its first
step's gradients (all parameters) with trl_default's: same weights, same batch (on-policy with beta 0 the loss
value itself is -mean(A) on both paths). Floor: 6 P N flops (P parameters, N tokens; attention and
recomputation not counted) at the measured bf16 matmul rate. Needs trl, transformers and datasets.

    python benchmarks/bench_trainer_step.py            # 4k and 16k tokens (GPU)
    python benchmarks/bench_trainer_step.py --quick    # a tiny Qwen2, any device (CI smoke test)
"""

from __future__ import annotations

import tempfile
from functools import partial

import torch
from harness import Results, arg_parser, floors, flops_floor_ms, on_cuda, rel_err, wanted

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256)  # fmt: skip
SWEEP, SEQ, PROMPT = (4096, 16384), 1024, 64
QUICK, QUICK_SEQ, QUICK_PROMPT = (32,), 16, 8


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

    return Qwen2Config(**(TINY if quick else QWEN25_05B), tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
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


def batch(tokens: int, seq: int, prompt: int, vocab: int, device: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(tokens)
    B = tokens // seq
    out = {"prompt_ids": torch.randint(3, vocab, (B, prompt), generator=g),
           "prompt_mask": torch.ones(B, prompt, dtype=torch.int64),
           "completion_ids": torch.randint(3, vocab, (B, seq), generator=g),
           "completion_mask": torch.ones(B, seq, dtype=torch.int64),
           "advantages": torch.randn(B, generator=g), "num_items_in_batch": torch.tensor(float(B * seq))}  # fmt: skip
    return {k: v.to(device) for k, v in out.items()}


def make_step(method: str, inputs: dict, quick: bool, workdir: str):
    """Build the model and trainer; return one training step (forward, loss, backward, optimizer step)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from papo_trl import PAPOConfig, PAPOTrainer

    cuda = on_cuda()
    B, T = inputs["completion_ids"].shape
    common = dict(output_dir=workdir, per_device_train_batch_size=B, num_generations=min(B, 8), max_completion_length=T,
                  max_steps=1, learning_rate=1e-6, logging_steps=10**6, report_to="none", save_strategy="no",
                  bf16=cuda, use_cpu=not cuda, loss_type="dapo", beta=0.0, seed=0, disable_tqdm=True,
                  dataloader_num_workers=0)  # fmt: skip
    if method == "papo_fused":
        cls, args = PAPOTrainer, PAPOConfig(**common, use_fused_loss=True, advantage_estimator="grpo")
    else:
        cls, args = GRPOTrainer, GRPOConfig(**common)
    model = build_model(model_config(quick), "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    trainer = cls(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
                  train_dataset=Dataset.from_list([{"prompt": "a"}] * B), processing_class=tokenizer())  # fmt: skip
    if method == "papo_fused" and not trainer._fused_loss:
        raise RuntimeError("PAPOTrainer did not enable the fused loss on this device")
    trainer._prepare_inputs = lambda _batch: inputs  # the generation step, left out of the measure
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
    trainer.model.train()
    optimizer = trainer.create_optimizer()

    first = [True]

    def step():
        loss = trainer.training_step(trainer.model, inputs, inputs["num_items_in_batch"])
        grads = None
        if first.pop() if first else False:  # the first step's gradients, for parity between the paths
            grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, grads

    return step


def grad_parity():
    """``check((loss, grads), method)``: keeps trl_default's first-step gradients, compares papo_fused's with them."""
    grads = {}

    def check(out, method: str) -> dict:
        loss, first_grads = out
        if method == "trl_default":
            grads[method] = first_grads
            return {"loss": float(loss)}
        ref = grads.pop("trl_default", None)
        return {"loss": float(loss), **({"rel_err_grad": rel_err(first_grads, ref)} if ref is not None else {})}

    return check


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    device = "cuda" if on_cuda() else "cpu"
    fl = floors(args.quick)
    config = model_config(args.quick)
    params = parameter_count(config)
    results = Results("trainer_step", resume=args.resume, floors=fl, parameters=params,
                      model="tiny-qwen2" if args.quick else "qwen2.5-0.5b-config")  # fmt: skip
    seq, prompt = (QUICK_SEQ, QUICK_PROMPT) if args.quick else (SEQ, PROMPT)
    with tempfile.TemporaryDirectory() as workdir:
        for tokens in QUICK if args.quick else SWEEP:
            inputs = batch(tokens, seq, prompt, config.vocab_size, device)
            check = grad_parity()
            for method in ("trl_default", "papo_fused"):
                if not wanted(args, method):
                    continue
                key = dict(method=method, tokens=tokens, seq=seq, dtype="bf16" if on_cuda() else "fp32")
                make = lambda m=method, inputs=inputs: make_step(m, inputs, args.quick, workdir)  # noqa: E731
                results.run(key, make, quick=args.quick, check=partial(check, method=method),
                            floor_ms=flops_floor_ms(6 * params * tokens, fl), limit_s=150)  # fmt: skip
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
