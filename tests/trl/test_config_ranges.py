"""PAPOConfig rejects out-of-range numbers of the options it inherits, for library users as for the CLI."""

import pytest

from tests.trl.tiny import tiny_args


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"learning_rate": -1.0}, r"`learning_rate` must be a finite number >= 0, got -1.0"),
        ({"learning_rate": float("nan")}, "`learning_rate`"),
        ({"lambda_process": -2.0}, r"`lambda_process` must be a finite number >= 0, got -2.0"),  # papo_advantages' rule
        ({"lambda_process": True}, r"`lambda_process` must be a finite number >= 0, got True"),
        ({"advantage_epsilon": True}, r"`advantage_epsilon` must be a finite number >= 0, got True"),
        ({"beta": -0.04}, "`beta`"),
        ({"epsilon": -0.2}, "`epsilon`"),
        ({"epsilon": 0.2, "epsilon_high": 0.1}, r"`epsilon_high` must be >= `epsilon` \(0.2\), got 0.1"),
    ],
)
def test_out_of_range_is_a_value_error_naming_the_option(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(tmp_path, **overrides)


def test_bounds_are_inclusive(tmp_path):
    args = tiny_args(tmp_path, learning_rate=0.0, lambda_process=0.0, beta=0.0, epsilon=0.2, epsilon_high=0.2)
    assert (args.learning_rate, args.lambda_process, args.beta, args.epsilon_high) == (0.0, 0.0, 0.0, 0.2)
    assert tiny_args(tmp_path, epsilon=0.3).epsilon_high is None  # unset: the lower bound, resolved by TRL
