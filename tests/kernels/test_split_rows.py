"""The split-row kernel (``loss/split.py``) against the torch reference, in fp64: every loss type and single-phase
option, vocabularies that do not divide into slices, masked rows, rows with zero coefficients, extreme logits,
softcapping and compacted rows (the fused linear head). Under Triton's interpreter a row's slices are walked by one
program (``WALK``) when a row has several, and the cooperative path itself runs when a row is one slice."""

import contextlib
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from papo_kernels import PolicyLossConfig, fused_linear_policy_loss, policy_loss
from papo_kernels.loss import launch, naive_policy_loss, split
from tests.kernels._policy_loss_cases import configs, input_options, kwargs_of, make_case, pack_case
from tests.kernels.test_policy_loss import assert_outputs_close, run

B, T, V = 3, 5, 37


@contextlib.contextmanager
def split_kernel(slice_: int, reread: bool = False):
    """The split kernel for the single-phase pass, with slices of ``slice_`` logits; yields the launch count."""
    saved = launch.ROW_KERNEL, split.SLICE, launch.split_rows
    launches = []

    def counted(*args, **kwargs):
        launches.append(args[6])  # n_rows
        return saved[2](*args, **kwargs)

    launch.ROW_KERNEL, split.SLICE, launch.split_rows = ("split-reread" if reread else "split"), slice_, counted
    try:
        yield launches
    finally:
        launch.ROW_KERNEL, split.SLICE, launch.split_rows = saved


def single_phase(cfg: PolicyLossConfig) -> PolicyLossConfig:
    """``cfg`` without its two-phase options (those take the row kernel)."""
    loss_type = cfg.loss_type.replace("vespo", "dapo")
    return dataclasses.replace(cfg, importance_sampling_level="token", top_entropy_quantile=1.0,
                               off_policy_mask_threshold=None, loss_type=loss_type)  # fmt: skip


@given(cfg=configs(T=T), opts=input_options(), seed=st.integers(0, 2**16), slice_=st.sampled_from([8, 16, 64]))
def test_split_matches_reference_fp64(cfg, opts, seed, slice_):
    """Slices of 8 and 16 logits (K = 5 and 3, the last one partial: walked), and 64 (K = 1: cooperative)."""
    cfg = single_phase(cfg)
    case = make_case(seed, B, T, V, cfg=cfg, **opts)
    with split_kernel(slice_) as launches:
        ours, g_ours = run(policy_loss, case, cfg)
    assert launches == [B * T]
    ref, g_ref = run(naive_policy_loss, case, cfg)
    assert_outputs_close(ours, ref, g_ours, g_ref, rtol=1e-10, atol=1e-12)


@given(cfg=configs(T=T), opts=input_options(), seed=st.integers(0, 2**16), slice_=st.sampled_from([16, 64]))
def test_split_packed_sequences_fp64(cfg, opts, seed, slice_):
    """Packed sequences (``cu_seqlens``: one row of tokens, empty sequences included): the padded reference."""
    cfg = single_phase(cfg)
    case = make_case(seed, B, T, V, cfg=cfg, **opts)
    lens = torch.tensor([T, 0, 2])
    packed, keep = pack_case(case, lens)
    with split_kernel(slice_) as launches:
        ours, g_ours = run(policy_loss, packed, cfg)
    assert launches == [int(lens.sum())]
    ref, g_ref = run(naive_policy_loss, case, cfg)
    ref = ref._replace(per_token_logps=ref.per_token_logps[keep][None], entropy=ref.entropy[keep][None])
    assert_outputs_close(ours, ref, g_ours[0], g_ref[keep], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reread", [False, True])
@pytest.mark.parametrize("slice_", [8, 64])
def test_extreme_logits_zero_coefficients_and_masked_rows(slice_, reread, device):
    """Logits of +-1e4 and -inf columns, a row with a zero coefficient (advantage 0, no KL or bonus) and a masked row
    holding NaN (never read): the reference's values, a zero gradient row for both."""
    cfg = PolicyLossConfig(loss_type="grpo", epsilon_high=0.28)
    case = make_case(3, B, T, V, cfg=cfg, masked_row=True, device=device)
    logits = case["logits"].clone()
    logits[0, 0, :5] = 1e4
    logits[0, 1, 3:9] = -1e4
    logits[1, :, 20:] = float("-inf")
    case["completion_ids"][1] = 2  # its target among the finite logits
    case["advantages"][1] = 0.0
    masked = logits.clone()
    masked[B - 1] = float("nan")
    case["logits"] = masked
    with split_kernel(slice_, reread):
        ours, g_ours = run(policy_loss, case, cfg)
    ref, g_ref = run(naive_policy_loss, dict(case, logits=logits), cfg)
    assert_outputs_close(ours, ref, g_ours, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.all(g_ours[1] == 0) and torch.all(g_ours[B - 1] == 0)


def test_inplace_and_strided_logits(device):
    cfg = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
    case = make_case(4, B, T, V, cfg=cfg, device=device)
    wide = torch.zeros(B, T, V + 5, dtype=torch.float64, device=device)
    wide[..., :V] = case["logits"]
    ref, g_ref = run(naive_policy_loss, case, cfg)
    with split_kernel(16):
        x = wide[..., :V].clone().requires_grad_()  # in place: the gradient overwrites these logits
        out = policy_loss(x * 1.0, case["completion_ids"], case["completion_mask"], case["advantages"], config=cfg,
                          inplace_grad=True, **kwargs_of(case))  # fmt: skip
        out.loss.backward()
        strided, g_strided = run(policy_loss, dict(case, logits=wide[..., :V]), cfg)
    assert_outputs_close(out, ref, x.grad, g_ref, rtol=1e-10, atol=1e-12)
    assert_outputs_close(strided, ref, g_strided, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("two_phase", [
    PolicyLossConfig(importance_sampling_level="sequence"), PolicyLossConfig(top_entropy_quantile=0.5),
    PolicyLossConfig(loss_type="vespo"), PolicyLossConfig(off_policy_mask_threshold=0.1),
])  # fmt: skip
def test_two_phase_options_take_the_row_kernel(two_phase, device):
    case = make_case(5, B, T, V, cfg=two_phase, device=device)
    with split_kernel(16) as launches:
        ours, g_ours = run(policy_loss, case, two_phase)
    assert launches == []
    ref, g_ref = run(naive_policy_loss, case, two_phase)
    assert_outputs_close(ours, ref, g_ours, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("slice_", [16, 64])
def test_fused_linear_compacted_rows_and_softcap(slice_, device):
    """The fused linear head's chunks (compacted rows, ``ROWS``) with softcapping and a logit scale."""
    g = torch.Generator().manual_seed(0)
    cfg = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01, temperature=0.8)
    hidden = torch.randn(B, T, 6, generator=g, dtype=torch.float64).to(device)
    weight = torch.randn(V, 6, generator=g, dtype=torch.float64).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[0, 3:] = 0
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(device)
    ref_logps = -3 + torch.randn(B, T, generator=g, dtype=torch.float64).to(device)
    kw = dict(ref_logps=ref_logps, config=cfg, logit_scale=0.5, final_logit_softcapping=4.0)
    results = []
    for use_split in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with split_kernel(slice_) if use_split else contextlib.nullcontext() as launches:
            out = fused_linear_policy_loss(h, w, ids, mask, adv, chunk_size=4, **kw)
        out.loss.backward()
        results.append((out, h.grad, w.grad))
        if use_split:
            assert sum(launches) == int(mask.sum())
    (ours, gh, gw), (theirs, gh_ref, gw_ref) = results
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12)


def test_bad_ids_flagged(device):
    cfg = PolicyLossConfig()
    case = make_case(5, B, T, V, cfg=cfg, device=device)
    case["completion_ids"][1, 0] = V
    case["completion_mask"][1, 0] = 1
    with split_kernel(16), pytest.raises(ValueError, match="completion_ids"):
        run(policy_loss, case, cfg)[0].check()


def test_groups_fit_the_co_resident_capacity():
    """The grid is whole groups of ``K`` programs within the co-resident capacity, none when a group does not fit."""
    assert split.split_groups(n_rows=10_000, K=75, capacity=660) == 8
    assert split.split_groups(n_rows=3, K=75, capacity=660) == 3
    assert split.split_groups(n_rows=10_000, K=75, capacity=74) == 0
    # occupancy on an H100/H200 SM: 4 warps at 91 registers a thread -> 5 programs; at 200 -> 2; shared memory bounds
    assert split.programs_per_sm(91, 4, 0) == 5
    assert split.programs_per_sm(200, 4, 0) == 2
    assert split.programs_per_sm(64, 4, 100_000) == 2
    assert split.programs_per_sm(32, 1, 0) == 32  # at most 32 programs
