"""Packed sequences (``cu_seqlens``: one row of ``N`` tokens, no padding) against the same sequences padded: the
kernels (logits and fused linear head) and the reference agree in fp64 with the padded reference on the loss, the
gradients, every metric and every per-token and per-sequence output, for every option; sequences of any length,
empty ones included."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from papo_kernels import PolicyLossConfig, fused_linear_policy_loss, policy_loss
from papo_kernels.loss import LOSS_TYPES, LossInputs, linear_logits, naive_policy_loss
from tests.kernels._policy_loss_cases import configs, input_options, kwargs_of, make_case, pack_case
from tests.kernels.test_policy_loss import assert_outputs_close

B, T, V, D = 4, 6, 11, 5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def lengths(draw, B: int = B, T: int = T) -> torch.Tensor:
    """Sequence lengths in ``[0, T]``, the longest ``T`` (the padded batch is as wide as its longest sequence)."""
    values = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    values[draw(st.integers(0, B - 1))] = T
    return torch.tensor(values)


def padded_and_packed(seed: int, cfg: PolicyLossConfig, opts: dict, lens: torch.Tensor, B: int = B, T: int = T):
    case = make_case(seed, B, T, V, cfg=cfg, device=DEVICE, **opts)
    packed, keep = pack_case(case, lens)
    return case, packed, keep


def run(fn, case, cfg, x):
    x = x.clone().requires_grad_()
    out = fn(x, case["completion_ids"], case["completion_mask"], case["advantages"], config=cfg, **kwargs_of(case))
    out.loss.backward()
    return out, x.grad


def unpad(out, keep):
    """The padded reference's per-token outputs at the packed tokens."""
    return out._replace(per_token_logps=out.per_token_logps[keep][None], entropy=out.entropy[keep][None])


@given(cfg=configs(T=T), opts=input_options(), lens=lengths(), seed=st.integers(0, 2**16))
def test_packed_kernels_and_reference_equal_padded_fp64(cfg, opts, lens, seed):
    case, packed, keep = padded_and_packed(seed, cfg, opts, lens)
    ref, g_ref = run(naive_policy_loss, case, cfg, case["logits"])
    ref = unpad(ref, keep)
    for fn in (policy_loss, naive_policy_loss):
        ours, g_ours = run(fn, packed, cfg, packed["logits"])
        assert ours.per_token_logps.shape == (1, int(lens.sum()))
        assert_outputs_close(ours, ref, g_ours[0], g_ref[keep], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_linear_packed_equals_padded_fp64(loss_type, level):
    """The hidden states and the head: ``hidden[1, N, D]``, gradients of both, with an empty sequence."""
    cfg = PolicyLossConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=0.04, entropy_coef=0.01, max_completion_length=9,
        epsilon_high=1.3 if loss_type == "cispo" else 0.28,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(DEVICE)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64).to(DEVICE)
    case = make_case(5, B, T, V, cfg=cfg, device=DEVICE, is_ratio="sequence" if level == "token" else "token")
    case["logits"] = linear_logits(hidden, weight)
    packed, keep = pack_case(case, torch.tensor([3, 0, T, 2]))

    def grads(case, h):
        h, w = h.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fused_linear_policy_loss(h, w, case["completion_ids"], case["completion_mask"], case["advantages"],
                                       config=cfg, chunk_size=4, **kwargs_of(case))  # fmt: skip
        out.loss.backward()
        return out, h.grad, w.grad

    ref, gh_ref, gw_ref = grads(case, hidden)
    ours, gh, gw = grads(packed, hidden[keep][None])
    assert_outputs_close(ours, unpad(ref, keep), gh[0], gh_ref[keep], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["vespo", "grpo"])
def test_sequences_of_at_most_one_token_are_a_padded_batch_of_width_one(loss_type):
    """The longest sequence sets the padded width: at most one token each, TRL's per-sequence reductions of a
    ``[B, 1]`` batch (clip fractions and VESPO's weight over ``B``), an empty sequence included."""
    cfg = PolicyLossConfig(loss_type=loss_type, importance_sampling_level="sequence")
    case, packed, keep = padded_and_packed(3, cfg, dict(adv_2d=True, is_ratio="sequence"), torch.tensor([1, 0, 1, 1]),
                                           T=1)  # fmt: skip
    assert LossInputs(packed["completion_mask"], packed["advantages"], cu_seqlens=packed["cu_seqlens"]).max_seqlen == 1
    ref, g_ref = run(naive_policy_loss, case, cfg, case["logits"])
    padded, g_padded = run(policy_loss, case, cfg, case["logits"])
    assert_outputs_close(padded, ref, g_padded, g_ref, rtol=1e-10, atol=1e-12)
    ours, g_ours = run(policy_loss, packed, cfg, packed["logits"])
    assert_outputs_close(ours, unpad(ref, keep), g_ours[0], g_ref[keep], rtol=1e-10, atol=1e-12)


def test_in_place_gradient_of_a_packed_row():
    cfg = PolicyLossConfig(loss_type="grpo", beta=0.04)
    case, packed, keep = padded_and_packed(2, cfg, {}, torch.tensor([2, T, 0, 4]))
    ref, g_ref = run(policy_loss, packed, cfg, packed["logits"])
    x = packed["logits"].clone().requires_grad_()
    out = policy_loss(x, packed["completion_ids"], packed["completion_mask"], packed["advantages"], config=cfg,
                      inplace_grad=True, **kwargs_of(packed))  # fmt: skip
    out.loss.backward()
    torch.testing.assert_close(x.grad, g_ref, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)


def test_pack_and_padded_are_inverse():
    """``LossInputs.pack(keep)`` packs a padded batch's tokens; ``padded()`` lays them out again (padding: mask 0, IS
    ratio 1, the rest 0)."""
    cfg = PolicyLossConfig(loss_type="vespo")
    case, packed, keep = padded_and_packed(4, cfg, dict(adv_2d=True, is_ratio="token", sampling=True),
                                           torch.tensor([2, T, 0, 5]))  # fmt: skip
    names = ("old_logps", "importance_sampling_ratio", "sampling_logps")
    inputs = LossInputs(case["completion_mask"], case["advantages"], **{n: case[n] for n in names})
    ours = inputs.pack(keep.to(DEVICE))
    assert ours.cu_seqlens.tolist() == packed["cu_seqlens"].tolist() and ours.max_seqlen == T
    for name in ("completion_mask", "advantages", *names):
        torch.testing.assert_close(getattr(ours, name), packed[name], rtol=0, atol=0, equal_nan=True, msg=name)
    again, index = ours.padded()
    assert again.cu_seqlens is None and index.tolist() == keep.reshape(-1).nonzero().squeeze(1).tolist()
    for name in ("completion_mask", "advantages", "importance_sampling_ratio"):  # pack_case padded them so
        torch.testing.assert_close(getattr(again, name), getattr(inputs, name), rtol=0, atol=0, msg=name)
    for name in ("old_logps", "sampling_logps"):
        got = getattr(again, name)
        assert got[~keep].eq(0).all()
        torch.testing.assert_close(got[keep], getattr(inputs, name)[keep], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "cu, fields, message",
    [
        ([0, 2, 5], {}, "`cu_seqlens` must rise from 0 to N = 4"),
        ([1, 2, 4], {}, "`cu_seqlens` must rise from 0 to N = 4"),
        ([0, 3, 2, 4], {}, "`cu_seqlens` must rise from 0 to N = 4"),
        ([0.0, 4.0], {}, "`cu_seqlens` must be a non-empty integer tensor"),
        ([0, 4], {"completion_mask": torch.ones(2, 2)}, "`completion_mask` must be one row [1, N]"),
        ([0, 1, 4], {"advantages": torch.zeros(3)}, "`advantages` must have shape (2,) or (1, 4)"),
        ([0, 1, 4], {"importance_sampling_ratio": torch.ones(1, 2)}, "shape (1, 4) or (2, 1)"),
        ([0, 1, 4], {"old_logps": torch.zeros(2, 2)}, "`old_logps` must have shape (1, 4)"),
        ([0, 1, 4], {"sequence_scale": torch.ones(1)}, "`sequence_scale` must have shape (2,)"),
    ],
)
def test_bad_packed_inputs_name_the_field(cu, fields, message):
    fields = {"completion_mask": torch.ones(1, 4), "advantages": torch.zeros(2), **fields}
    with pytest.raises(ValueError) as err:
        LossInputs(**fields, cu_seqlens=torch.tensor(cu))
    assert message in str(err.value), str(err.value)
