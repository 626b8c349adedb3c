"""``padding_free``: every forward of a step on one packed row per micro-batch trains as the padded batch does.

In fp64 with sdpa, on batches with left-padded prompts and completions of 1 to 8 tokens: the loss, its gradients and
TRL's logged metrics for every loss type and option (the fused linear-head loss and TRL's own), and the logs and
weights of training runs (PEFT, gradient accumulation, dynamic sampling, DARO) agree with the padded run to 1e-10.
One exception: TRL's own LM head (``ChunkedLogProbFunction``, the loss with ``use_fused_loss=False``) computes in fp32
whatever the model's dtype and sums its weight's gradient over the tokens in fp32, in the order of the rows, which
packing changes: that gradient, and what the optimiser makes of it, agree to fp32 rounding.
The model never sees a padded token; ``padding_free`` resolves to on where the attention takes packed sequences,
and asking for it where it cannot is a ``ValueError`` naming the option.
"""

import copy

import pytest
import torch

from papo_trl import PAPOTrainer, packing
from papo_trl.packing import first_fit, pack_rows, packing_unsupported
from tests.trl import tiny
from tests.trl.test_trainer_sampling import mostly_uniform_reward

TOKENIZER = tiny.tiny_tokenizer()
TOL = 1e-10
FP32_SUM = 1e-6  # TRL's LM head: its weight's gradient summed in fp32 (relative to the largest gradient)
FP64_SDPA = {"dtype": "auto", "attn_implementation": "sdpa"}


@pytest.fixture(scope="module", autouse=True)
def fp64_rotary_one_thread():
    """fp64 rotary embeddings (see ``tiny.rotary_in_model_dtype``); one intra-op thread for a model this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tiny.rotary_in_model_dtype():
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Qwen2 in fp64, saved: the policy and TRL's reference model load the same weights."""
    path = tmp_path_factory.mktemp("tiny-qwen2-fp64")
    tiny.tiny_model(TOKENIZER).double().save_pretrained(path)
    return str(path)


class Fixed(tiny.FixedCompletions, PAPOTrainer):
    pass


def make_trainer(model_dir, out, padding_free=None, process=(), reward=tiny.digit_outcome_reward, peft_config=None,
                 **overrides):  # fmt: skip
    args = tiny.tiny_args(out, model_init_kwargs=FP64_SDPA, padding_free=padding_free, **overrides)
    return Fixed(model=model_dir, reward_funcs=[reward], process_reward_funcs=list(process), args=args,
                 train_dataset=tiny.varied_dataset(), processing_class=TOKENIZER, peft_config=peft_config)  # fmt: skip


def trainable(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])


def vllm_inputs(trainer, inputs, level: str) -> None:
    """The vLLM importance-sampling inputs as TRL builds them: the sampler's log-probs near the old ones (one NaN)
    and the ratio per token (1 in the padding) or per sequence."""
    mask = inputs["completion_mask"]
    g = torch.Generator().manual_seed(0)
    sampling = inputs["old_per_token_logps"] + 0.1 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    sampling[0, 0] = float("nan")
    diff = torch.nan_to_num((inputs["old_per_token_logps"] - sampling) * mask, nan=0.0)
    inputs["sampling_per_token_logps"] = sampling
    inputs["importance_sampling_ratio"] = torch.exp(diff if level == "token" else diff.sum(-1, keepdim=True))
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True


STATE = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats", "_daro")
OFF_POLICY = dict(num_iterations=2)  # old log-probs from the no-grad pass
LOSS_OPTIONS = {
    "dapo": {},
    "grpo-sequence-kl-delta": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, delta=1.5),
    "bnpo-top_entropy_quantile": dict(loss_type="bnpo", top_entropy_quantile=0.5),
    "dr_grpo-entropy_coef": dict(loss_type="dr_grpo", entropy_coef=0.01, beta=0.04),
    "cispo-off_policy_mask-vllm": dict(loss_type="cispo", off_policy_mask_threshold=0.0, epsilon_high=1.2),
    "sapo-bias_correction_kl": dict(loss_type="sapo", beta=0.04, use_bias_correction_kl=True),
    "luspo-sequence-vllm": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo-vllm": dict(loss_type="vespo"),
    "vespo-sequence-vllm": dict(loss_type="vespo", importance_sampling_level="sequence"),
    "adaptive_entropy": dict(use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=1e3),
    "daro": dict(advantage_estimator="daro"),
}


ONE_ROW = ("dapo", "grpo-sequence-kl-delta", "vespo-vllm", "daro")  # also packed into one row


@pytest.mark.parametrize("fused", [True, False], ids=["fused_loss", "trl_loss"])
@pytest.mark.parametrize("name, one_row", [(n, False) for n in sorted(LOSS_OPTIONS)] + [(n, True) for n in ONE_ROW])
def test_loss_gradients_and_metrics_equal_padded(name, one_row, fused, model_dir, tmp_path, monkeypatch):
    """Rows no wider than the longest sequence (sdpa's), and one row (the varlen attentions')."""
    monkeypatch.setattr(packing, "one_row", lambda model: one_row)
    overrides = {"advantage_estimator": "grpo", **OFF_POLICY, **LOSS_OPTIONS[name]}
    trainer = make_trainer(model_dir, tmp_path, use_fused_loss=fused, **overrides)
    assert trainer._padding_free and trainer._fused_loss == fused
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    results = {}
    for padding_free in (False, True):
        trainer._padding_free = padding_free
        state = {k: copy.deepcopy(getattr(trainer, k)) for k in STATE}  # as the step found them (DARO's weights)
        trainer._step, trainer._buffered_inputs = 0, None  # generate again: the no-grad passes in this mode
        torch.manual_seed(0)  # TRL's shuffle of the generation batch
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        if name.endswith("vllm"):
            vllm_inputs(trainer, inputs, trainer.args.importance_sampling_level)
        with torch.no_grad():  # away from the sampling policy: ratios off 1, clipped and masked tokens
            for p in params:
                p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
        trainer._metrics["train"].clear()
        loss = trainer._compute_loss(trainer.model, inputs)
        grads = torch.autograd.grad(loss, params)
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results[padding_free] = (inputs, loss.detach(), grads, metrics)
        with torch.no_grad():
            for p in params:
                p.sub_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
        for key, value in copy.deepcopy(state).items():  # setattr: TRL's entropy fields are the controller's
            setattr(trainer, key, value)
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = False
    (inputs, loss, grads, metrics), (inputs_p, loss_p, grads_p, metrics_p) = results[False], results[True]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    rows = trainer._pack(trainer.model, ids, mask, inputs["completion_ids"].shape[1])
    assert rows is not None and rows.input_ids.shape[0] < ids.shape[0]  # the batch was packed
    for key, value in inputs.items():  # the old-policy and reference log-probs of the packed no-grad passes
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(inputs_p[key], value, rtol=TOL, atol=TOL, equal_nan=True, msg=key)
    torch.testing.assert_close(loss_p, loss, rtol=TOL, atol=TOL)
    scale = max(g.abs().max().item() for g in grads)
    head = trainer.model.get_output_embeddings().weight
    for param, got, want in zip(params, grads_p, grads, strict=True):
        tol = FP32_SUM if param is head and not fused else TOL
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)
    assert set(metrics_p) == set(metrics)
    for key, want in metrics.items():
        assert metrics_p[key] == pytest.approx(want, rel=TOL, abs=TOL, nan_ok=True), key


RUNS = {
    "fused_loss": dict(advantage_estimator="grpo"),
    "trl_loss": dict(advantage_estimator="grpo", use_fused_loss=False),
    "peft": dict(advantage_estimator="grpo", beta=0.04),  # the reference model: the adapter disabled
    "gradient_accumulation": dict(advantage_estimator="grpo", gradient_accumulation_steps=2,
                                  per_device_train_batch_size=4),
    "dynamic_sampling": dict(dynamic_sampling=True, max_generation_batches=3, reward=mostly_uniform_reward,
                             process=(tiny.digit_process_reward,)),
    "daro": dict(advantage_estimator="daro", daro_learning_rate=0.2),
}  # fmt: skip
TIMINGS = ("time", "runtime", "per_second")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_training_equals_padded(name, model_dir, tmp_path):
    """Two optimiser steps, the second from the first's weights: the logged values step for step and the weights."""
    overrides = {"max_steps": 2, "learning_rate": 1e-2, **RUNS[name]}
    if name == "peft":
        from peft import LoraConfig

        overrides["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    runs = {}
    for padding_free in (False, True):
        trainer = make_trainer(model_dir, tmp_path / str(padding_free), padding_free, **overrides)
        initial = trainable(trainer)
        trainer.train()
        runs[padding_free] = (trainer, trainable(trainer))
    (padded, weights), (packed, weights_packed) = runs[False], runs[True]
    tol = FP32_SUM if name == "trl_loss" else TOL  # TRL's LM head, its weight's gradient summed in fp32
    assert packed._padding_free and not padded._padding_free
    assert not torch.equal(weights, initial)
    logs, logs_packed = padded.state.log_history, packed.state.log_history
    assert len(logs_packed) == len(logs)
    for want, got in zip(logs, logs_packed, strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, float) and not any(t in key for t in TIMINGS):
                assert got[key] == pytest.approx(value, rel=tol, abs=tol, nan_ok=True), key
            elif not isinstance(value, float):
                assert got[key] == value, key
    torch.testing.assert_close(weights_packed, weights, rtol=0, atol=tol)


@pytest.mark.parametrize("one_row", [True, False], ids=["one_row", "rows"])
def test_no_padded_token_reaches_the_model(one_row, model_dir, tmp_path, monkeypatch):
    """Every forward of a step (old policy, reference model, the gradient pass) holds the batch's tokens: all of
    them in one row (the varlen attentions) or in fewer rows than sequences, no wider than the longest (sdpa)."""
    monkeypatch.setattr(packing, "one_row", lambda model: one_row)
    trainer = make_trainer(model_dir, tmp_path, advantage_estimator="grpo", beta=0.04, max_steps=1, **OFF_POLICY)
    shapes, batches = [], []
    for model in (trainer.model, trainer.ref_model):
        model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    prepare = trainer._prepare_inputs

    def spy(batch):
        inputs = prepare(batch)
        batches.append(torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1))
        return inputs

    trainer._prepare_inputs = spy
    trainer.train()
    mask = batches[0]
    lengths = mask.sum(1)
    passes = [shape for shape in shapes if shape[1] > 1 and shape[0] < mask.shape[0]]  # not generation's
    assert len(passes) == 3  # old policy, reference model, gradient pass
    if one_row:
        assert set(passes) == {(1, int(lengths.sum()))}
    else:
        assert len(set(passes)) == 1 and passes[0][1] == lengths.max() and passes[0][0] < mask.shape[0]


def test_padding_free_resolves_where_the_attention_takes_packed_sequences(model_dir, tmp_path):
    model = tiny.tiny_model(TOKENIZER)
    assert packing_unsupported(model) is None
    assert make_trainer(model_dir, tmp_path)._padding_free
    assert not make_trainer(model_dir, tmp_path, padding_free=False)._padding_free
    model.config._attn_implementation = "paged|sdpa"
    assert "'paged|sdpa'" in packing_unsupported(model)
    trainer = PAPOTrainer(model=model, reward_funcs=tiny.digit_outcome_reward, args=tiny.tiny_args(tmp_path),
                          train_dataset=tiny.tiny_dataset(), processing_class=TOKENIZER)  # fmt: skip
    assert not trainer._padding_free
    recurrent = tiny.tiny_model(TOKENIZER)
    recurrent.config.layer_types = ["full_attention", "linear_attention"]
    assert "['linear_attention'] layers" in packing_unsupported(recurrent)
    assert "multimodal" in packing_unsupported(tiny.tiny_model(TOKENIZER), is_multimodal=True)


def test_padding_free_where_the_attention_cannot_pack_names_the_option(tmp_path):
    model = tiny.tiny_model(TOKENIZER)
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError) as err:
        PAPOTrainer(model=model, reward_funcs=tiny.digit_outcome_reward, train_dataset=tiny.tiny_dataset(),
                    args=tiny.tiny_args(tmp_path, padding_free=True), processing_class=TOKENIZER)  # fmt: skip
    assert "`padding_free=True`" in str(err.value) and "'paged|sdpa'" in str(err.value)


def test_pack_rows_layout():
    """Prompts left-padded, completions right-padded (3 columns): one row, or rows as wide as the longest sequence."""
    ids = torch.tensor([[0, 5, 6, 7, 8, 0], [0, 0, 4, 9, 0, 0], [0, 0, 3, 2, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]])
    row, rows = pack_rows(ids, mask, 3), pack_rows(ids, mask, 3, one_row=False)
    assert row.input_ids.tolist() == [[5, 6, 7, 8, 4, 9, 3, 2]]
    assert rows.input_ids.tolist() == [[5, 6, 7, 8], [4, 9, 3, 2]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1]] == rows.position_ids.view(1, -1).tolist()
    assert row.completion.tolist() == [[True, True, False], [True, False, False], [True, False, False]]
    assert row.predict.tolist() == rows.predict.tolist() == [1, 2, 4, 6]  # the tokens before 7, 8, 9 and 2
    assert row.padded(torch.arange(8.0)[None]).tolist() == [[1.0, 2.0, 0.0], [4.0, 0.0, 0.0], [6.0, 0.0, 0.0]]
    assert pack_rows(ids[:2], mask[:2], 3, one_row=False) is None  # a row each: nothing to save
    assert first_fit([3, 5, 2, 4], 5) == ([10, 0, 13, 5], 3)  # 5 | 4 | 3 + 2
    with pytest.raises(ValueError, match="`padding_free=True`"):  # a hole in a row
        pack_rows(ids, torch.tensor([[0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]]), 3)
    with pytest.raises(ValueError, match="`padding_free=True`"):  # a completion without a prompt
        pack_rows(ids, torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]]), 3)
