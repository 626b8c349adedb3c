"""A tiny transformers causal LM patched with ``add_fused_policy_loss_head`` gives the loss and the gradients of
the unpatched model followed by the eager loss: plain and tied heads, softcapping, logit scale, PEFT, TRL's own
patch underneath, a DTensor head (FSDP2) and the ZeRO-3 gather hook."""

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from papo_kernels import PolicyLossConfig
from papo_kernels.loss import LossInputs
from papo_kernels.loss.naive import naive_logits_loss
from papo_trl import fused_head
from papo_trl.fused_head import HeadLoss, add_fused_policy_loss_head, head_transform

V, P, T, B = 32, 4, 5, 3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=4, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)  # fmt: skip


def tiny(kind="qwen2", tie=False, **extra):
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=tie, **extra))
    elif kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**SMALL, final_logit_softcapping=2.5, attn_logit_softcapping=None))
    else:
        model = CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.5))
    return model.double().to(DEVICE).train()


def batch(cfg: PolicyLossConfig, seed=0, left_pad=True):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    if left_pad:
        prompt_mask[0, :2] = 0
    completion = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    f64 = lambda: torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    advantages, old_logps = torch.randn(B, generator=g, dtype=torch.float64), -3 + 0.3 * f64()
    ref_logps = -3 + 0.3 * f64() if cfg.beta else None
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    inputs = LossInputs(on(mask), on(advantages), old_logps=on(old_logps), ref_logps=on(ref_logps))
    head_loss = HeadLoss(completion.to(DEVICE), inputs, cfg)
    return torch.cat([prompt, completion], 1).to(DEVICE), torch.cat([prompt_mask, mask], 1).to(DEVICE), head_loss


def eager(model, input_ids, attention_mask, head_loss):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -T - 1 : -1]
    return naive_logits_loss(logits, head_loss.completion_ids, head_loss.inputs, head_loss.config)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, cfg, patch_fn=add_fused_policy_loss_head, left_pad=True, **patch_kw):
    input_ids, attention_mask, inputs = batch(cfg, left_pad=left_pad)
    patched = copy.deepcopy(model)
    patch_fn(patched, **patch_kw)
    ref = eager(model, input_ids, attention_mask, inputs)
    ref.loss.backward()
    out, _ = patched(input_ids=input_ids, attention_mask=attention_mask, policy_loss=inputs)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.per_token_logps, ref.per_token_logps, rtol=1e-10, atol=1e-12)
    g_ref, g_out = grads(model), grads(patched)
    assert set(g_ref) == set(g_out)
    for name in g_ref:
        torch.testing.assert_close(g_out[name], g_ref[name], rtol=1e-9, atol=1e-12, msg=name)
    return patched, out


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_patched_model_matches_unpatched_model(tie, level):
    cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level=level, beta=0.04, entropy_coef=0.01,
                           temperature=0.8)  # fmt: skip
    patched, out = compare(tiny(tie=tie), cfg, chunk_size=4)
    assert set(out.metrics) >= {"entropy", "kl", "policy_loss"}
    # without policy_loss the forward is the original one: generation is unchanged
    x = torch.randint(3, V, (1, 4), device=DEVICE)
    torch.testing.assert_close(patched(input_ids=x).logits, tiny(tie=tie)(input_ids=x).logits)
    assert patched.generate(x, max_new_tokens=2, do_sample=False).shape == (1, 6)


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_softcapping_and_logit_scale_heads(kind):
    model = tiny(kind)
    scale, cap = head_transform(model.config.get_text_config())
    assert (scale, cap) == ((1.0, 2.5) if kind == "gemma2" else (0.5, None))
    # (no left padding: eager Gemma2 attention gives NaN gradients on fully masked rows, patched or not)
    compare(model, PolicyLossConfig(loss_type="dapo", temperature=0.7, entropy_coef=0.02), left_pad=False)


def test_training_steps_match():
    """Two SGD steps through the patched model land on the same parameters as through the unpatched one."""
    cfg = PolicyLossConfig(loss_type="dapo", epsilon_high=0.28, beta=0.02)
    model = tiny()
    patched = copy.deepcopy(model)
    add_fused_policy_loss_head(patched)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, patched)]
    for step in range(2):
        input_ids, attention_mask, inputs = batch(cfg, seed=step)
        eager(model, input_ids, attention_mask, inputs).loss.backward()
        patched(input_ids=input_ids, attention_mask=attention_mask, policy_loss=inputs)[0].loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for (name, a), (_, b) in zip(model.named_parameters(), patched.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)


def test_peft_frozen_head():
    peft = pytest.importorskip("peft")
    cfg = PolicyLossConfig(loss_type="grpo", entropy_coef=0.01)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny(), lora)
    patched = copy.deepcopy(model)
    add_fused_policy_loss_head(patched.get_base_model())
    input_ids, attention_mask, inputs = batch(cfg)
    eager(model, input_ids, attention_mask, inputs).loss.backward()
    out, _ = patched(input_ids=input_ids, attention_mask=attention_mask, policy_loss=inputs)
    out.loss.backward()
    g_ref, g_out = grads(model), grads(patched)
    assert g_ref and set(g_ref) == set(g_out) and all("lora" in n for n in g_out)
    for name in g_ref:
        torch.testing.assert_close(g_out[name], g_ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_composes_with_trls_fused_head():
    from trl.trainer.utils import add_fused_lm_head

    model = tiny()

    def both(m, **_):
        add_fused_lm_head(m, outputs=("log_probs", "entropy"))
        add_fused_policy_loss_head(m)

    cfg = PolicyLossConfig(loss_type="bnpo")
    patched, _ = compare(model, cfg, patch_fn=both)
    input_ids, attention_mask, _ = batch(cfg)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    assert out.log_probs.shape == (B, P + T - 1)  # TRL scores the shifted labels


def test_zero3_gather_hook_wraps_the_head(monkeypatch):
    seen = []

    @contextmanager
    def gather(*params):
        seen.append(params)
        yield

    monkeypatch.setattr(fused_head, "maybe_gather_lm_head_ctx", gather)
    model = tiny(tie=True)
    compare(model, PolicyLossConfig())
    assert len(seen) == 1 and seen[0][0].shape == (V, SMALL["hidden_size"])


class HeadShapedTensors(TorchDispatchMode):
    """Records every aten op that produces a tensor of the LM head's shape ``[V, D]`` (an accumulator, a gradient)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ops = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape for t in pytree.tree_leaves(out)):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_head_gets_no_weight_gradient_and_no_accumulator(frozen):
    """A frozen head (PEFT freezes it, and the tied input embeddings): forward and backward produce no tensor of
    the head's shape at all, so neither a weight gradient nor its fp32 accumulator is allocated."""
    model = tiny(tie=True)
    add_fused_policy_loss_head(model)
    model.lm_head.weight.requires_grad_(not frozen)  # tied: the input embeddings' weight too
    input_ids, attention_mask, inputs = batch(PolicyLossConfig(loss_type="grpo", entropy_coef=0.01))
    with HeadShapedTensors(model.lm_head.weight.shape) as seen:
        out, _ = model(input_ids=input_ids, attention_mask=attention_mask, policy_loss=inputs)
        out.loss.backward()
    assert (model.lm_head.weight.grad is None) == frozen
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None  # the rest of the model still trains
    assert bool(seen.ops) != frozen, seen.ops  # trainable: the accumulator and the gradient show up


@pytest.mark.skipif(DEVICE != "cpu", reason="a one-rank gloo mesh over CPU tensors")
def test_dtensor_head(tmp_path):
    """A head that is an FSDP2 unit of its own is a DTensor shard in the forward: it is gathered, its gradient flows
    back to the shard. A DTensor head outside FSDP (tensor parallelism) is refused, naming the option."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = tiny()
        sharded = copy.deepcopy(model)
        add_fused_policy_loss_head(sharded)
        fully_shard(sharded.lm_head, mesh=mesh)
        assert isinstance(sharded.lm_head.weight, DTensor)
        cfg = PolicyLossConfig(loss_type="grpo", entropy_coef=0.01)
        input_ids, attention_mask, inputs = batch(cfg)
        ref = eager(model, input_ids, attention_mask, inputs)
        ref.loss.backward()
        out, _ = sharded(input_ids=input_ids, attention_mask=attention_mask, policy_loss=inputs)
        out.loss.backward()
        torch.testing.assert_close(out.loss, ref.loss)
        grad = sharded.lm_head.weight.grad
        assert isinstance(grad, DTensor)
        torch.testing.assert_close(grad.full_tensor(), model.lm_head.weight.grad)

        tensor_parallel = copy.deepcopy(model)
        add_fused_policy_loss_head(tensor_parallel)
        weight = distribute_tensor(tensor_parallel.lm_head.weight.data, mesh, [Shard(0)])
        tensor_parallel.lm_head.weight = torch.nn.Parameter(weight)
        with pytest.raises(ValueError, match="use_fused_loss"):
            tensor_parallel(input_ids=input_ids, attention_mask=attention_mask, policy_loss=inputs)
    finally:
        dist.destroy_process_group()
