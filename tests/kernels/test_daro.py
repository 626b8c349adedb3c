"""DARO's pass-rate weights: objective, fixed point, per-sequence scale, bounds and validation."""

import math

import pytest
import torch

from papo_kernels import DAROWeights
from papo_kernels.daro import bucket_loss_stats


def test_bucket_loss_stats_sums_per_bucket():
    seq_loss = torch.tensor([1.0, 2.0, -3.0, 4.0, 0.5])
    tokens = torch.tensor([2.0, 3.0, 1.0, 4.0, 5.0])
    buckets = torch.tensor([1, 1, 2, 0, 4])
    loss, count = bucket_loss_stats(seq_loss, tokens, buckets, G=4)
    assert loss.tolist() == [4.0, 3.0, -3.0, 0.0, 0.5]
    assert count.tolist() == [4.0, 5.0, 1.0, 0.0, 5.0]


def test_objective_value_uses_present_buckets_and_loss_scale():
    daro = DAROWeights(4, init_weight=2.0)
    loss = torch.tensor([9.0, 3.0, -2.0, 0.0, 9.0], dtype=torch.float64)
    tokens = torch.tensor([1.0, 6.0, 4.0, 0.0, 1.0], dtype=torch.float64)
    # buckets 1 and 2 present (k = 0, G excluded; k = 3 absent): |L_1| = 0.5, |L_2| = 0.5
    expected = 2 * (2.0 * 0.5 - math.log(2.0))
    assert daro(loss, tokens).item() == pytest.approx(expected, rel=1e-6)


def test_gradient_is_seed_fixed_point_condition():
    daro = DAROWeights(3, init_weight=0.5)
    loss = torch.tensor([0.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    tokens = torch.tensor([0.0, 4.0, 1.0, 0.0], dtype=torch.float64)
    daro(loss, tokens).backward()
    # d/ds (e^s |L| - s) = w |L| - 1
    expected = torch.tensor([0.5 * 0.5 - 1, 0.5 * 1.0 - 1])
    torch.testing.assert_close(daro.log_weights.grad, expected)


def test_weights_converge_to_inverse_loss_scale():
    G = 4
    daro = DAROWeights(G)
    opt = torch.optim.Adam(daro.parameters(), lr=0.05)
    scales = torch.tensor([0.0, 0.25, -0.5, 2.0, 0.0], dtype=torch.float64)  # bucket 2 has a negative loss
    tokens = torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    for _ in range(800):
        opt.zero_grad()
        daro(scales * tokens, tokens).backward()
        opt.step()
        daro.clamp_()
    torch.testing.assert_close(daro.weights, torch.tensor([4.0, 2.0, 0.5]), rtol=1e-2, atol=1e-2)
    products = daro.weights.detach() * scales[1:G].abs().float()
    torch.testing.assert_close(products, torch.ones(G - 1), rtol=1e-2, atol=1e-2)


def test_absent_bucket_keeps_its_weight():
    daro = DAROWeights(4)
    opt = torch.optim.SGD(daro.parameters(), lr=0.1)
    opt.zero_grad()
    daro(torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0])).backward()
    opt.step()
    assert daro.weights[1].item() == pytest.approx(1.0)
    assert daro.weights[0].item() != pytest.approx(1.0)


def test_clamp_bounds_weights():
    daro = DAROWeights(3, max_weight=10.0)
    with torch.no_grad():
        daro.log_weights.copy_(torch.tensor([5.0, -5.0]))
    daro.clamp_()
    torch.testing.assert_close(daro.weights.detach(), torch.tensor([10.0, 0.1]))


def test_sequence_scale_reproduces_weighted_bucket_losses():
    G = 4
    daro = DAROWeights(G)
    with torch.no_grad():
        daro.log_weights.copy_(torch.log(torch.tensor([0.5, 2.0, 3.0])))
    seq_loss = torch.tensor([1.0, -2.0, 0.5, 3.0, 7.0, -1.0])
    seq_tokens = torch.tensor([2.0, 4.0, 1.0, 3.0, 5.0, 2.0])
    buckets = torch.tensor([1, 1, 2, 2, 0, 3])
    loss, tokens = bucket_loss_stats(seq_loss, seq_tokens, buckets, G)
    scale = daro.sequence_scale(buckets, tokens[buckets])
    weighted = (scale * seq_loss).sum()
    expected = sum(daro.bucket_weights()[k] * loss[k] / tokens[k] for k in (1, 2, 3))
    assert weighted.item() == pytest.approx(float(expected), rel=1e-6)
    assert scale[4].item() == 0.0  # bucket k = 0 is excluded


def test_bucket_weights_layout():
    daro = DAROWeights(3, init_weight=2.0)
    assert daro.bucket_weights().tolist() == [0.0, 2.0, 2.0, 0.0]
    assert not daro.bucket_weights().requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_generations": 1}, "num_generations"),
        ({"num_generations": 4, "max_weight": 0.5}, "max_weight"),
        ({"num_generations": 4, "init_weight": 1000.0}, "init_weight"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DAROWeights(**kwargs)


def test_bad_shapes_raise():
    daro = DAROWeights(4)
    with pytest.raises(ValueError, match="bucket_loss"):
        daro(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="sequence_loss"):
        bucket_loss_stats(torch.zeros(3), torch.zeros(2), torch.zeros(3), 4)
