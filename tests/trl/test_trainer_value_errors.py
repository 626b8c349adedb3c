"""PAPOTrainer raises the advantage kernel's value errors where it synchronises anyway (when it logs the
advantages), not inside the kernel call. The CUDA behaviour of the call (the flag stays in the result) is
selected on CPU by patching ``api._raise_now``."""

import pytest

from papo_kernels.advantages import api
from papo_trl import PAPOTrainer
from tests.trl.tiny import (
    digit_outcome_reward,
    digit_process_reward,
    tiny_args,
    tiny_dataset,
    tiny_model,
    tiny_tokenizer,
)


def infinite_reward(completions, **kwargs) -> list[float]:
    return [float("inf")] + [0.0] * (len(completions) - 1)


@pytest.mark.parametrize(
    "estimator,message", [("papo", "`outcome` must be finite"), ("grpo", "`rewards` contains"), ("gdpo", "`rewards`")]
)
def test_trainer_raises_the_flag_when_it_logs(tmp_path, monkeypatch, estimator, message):
    calls = []
    monkeypatch.setattr(api, "_raise_now", lambda error, validate: calls.append(validate) or validate)
    tokenizer = tiny_tokenizer()
    trainer = PAPOTrainer(
        model=tiny_model(tokenizer),
        reward_funcs=[digit_outcome_reward, infinite_reward],
        process_reward_funcs=[digit_process_reward],
        args=tiny_args(tmp_path, advantage_estimator=estimator, max_steps=1),
        train_dataset=tiny_dataset(),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert calls == [False]  # the kernel call itself was asked not to synchronise
