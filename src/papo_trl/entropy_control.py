"""TRL 1.16's entropy bonus coefficient and its adaptive control (Skywork-OR1), for the ``papo_kernels`` loss path.

TRL keeps the controller's state on the trainer (``entropy_coef``, ``_last_world_entropy``, ``_entropy_window_stats``;
checkpointed in ``entropy_ctrl_state.json``) and updates it inside its ``_compute_loss``. Here the state lives in one
:class:`EntropyControl`, and :func:`trl_field` gives the trainer TRL's names for it: TRL's own loss, checkpoint and
logging read and write the same state as the kernel loss path.
"""

from __future__ import annotations

import dataclasses

import torch

from papo_kernels import PolicyLossConfig


class EntropyControl:
    """The entropy bonus ``-c * H`` of TRL's loss: the coefficient ``c`` (``coef``), the entropy ``H`` measured over
    the last optimizer step (``last_world_entropy``, ``inf`` before the first) and the statistics of the current
    window of micro-batches (``window_stats``: entropy sum and token count over the tokens the bonus acts on;
    ``None`` between windows).

    Static control keeps ``c = entropy_coef``. Adaptive control (``use_adaptive_entropy``) applies ``c`` while
    ``H <= entropy_target`` and 0 otherwise; at each optimizer-step boundary it sets ``H`` = the window's entropy
    over all processes and moves ``c`` by ``entropy_coef_delta``, up when ``H <= entropy_target`` and down otherwise,
    within ``[entropy_coef_min, entropy_coef_max]``.
    """

    def __init__(self, args):
        self.args = args
        self.enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy  # TRL's `_entropy_bonus_enabled`
        self.coef = args.entropy_coef
        self.last_world_entropy = float("inf")
        self.window_stats: torch.Tensor | None = None

    @property
    def adaptive(self) -> bool:
        return self.args.use_adaptive_entropy

    def applied_coef(self) -> float:
        """The coefficient a micro-batch of the current window applies."""
        if self.adaptive and self.last_world_entropy > self.args.entropy_target:
            return 0.0
        return self.coef

    def loss_config(self, config: PolicyLossConfig) -> PolicyLossConfig:
        """``config`` with the coefficient a micro-batch of the current window applies (``config`` itself without
        adaptive control)."""
        if not self.adaptive:
            return config
        return dataclasses.replace(config, entropy_coef=float(self.applied_coef()))

    def update(self, entropy_stats: torch.Tensor, mode: str, accelerator, metrics: dict[str, list]) -> None:
        """After a micro-batch's loss: under adaptive control in training, add its ``entropy_stats`` to the window
        and, at an optimizer-step boundary, reduce the window over processes and move the coefficient. With an
        entropy bonus, log ``entropy_coef`` into ``metrics`` at each training optimizer-step boundary, as TRL does."""
        if not self.enabled or mode != "train":
            return
        sync = accelerator.sync_gradients
        if self.adaptive:
            stats = entropy_stats.detach().clone()
            self.window_stats = stats if self.window_stats is None else self.window_stats + stats
            if sync:
                args = self.args
                totals = accelerator.reduce(self.window_stats, reduction="sum")
                self.last_world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                if self.last_world_entropy <= args.entropy_target:
                    self.coef = min(self.coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.coef = max(self.coef - args.entropy_coef_delta, args.entropy_coef_min)
                self.window_stats = None
        if sync:
            metrics["entropy_coef"].append(self.coef)


def trl_field(name: str) -> property:
    """A trainer property under TRL's name for the ``EntropyControl`` field ``name`` of ``trainer._entropy_control``."""
    return property(
        lambda trainer: getattr(trainer._entropy_control, name),
        lambda trainer, value: setattr(trainer._entropy_control, name, value),
        doc=f"TRL's name for ``EntropyControl.{name}``.",
    )
