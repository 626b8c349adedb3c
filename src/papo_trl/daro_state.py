"""DARO's trainer state: the weights, their optimiser and the statistics of the current optimiser step; the math
(the weights' objective, the bucket sums, the per-sequence scale) is :mod:`papo_kernels.daro`.

The policy loss of a micro-batch is ``sum_b scale_b * sum_t loss_bt`` with ``scale_b = w_k / T_k`` (``k`` the
pass-rate bucket of the sequence's group, ``T_k`` the bucket's token count over the whole generation batch,
gathered across processes), times the same data-parallel and accumulation factor TRL's ``dapo`` normaliser uses,
so that after gradient averaging and accumulation the update is ``grad sum_k w_k L_k`` with ``L_k`` the bucket's
token-mean loss. The weights are held fixed during an optimiser step; at its end the per-bucket loss sums and token
counts of the step are all-reduced, every process takes the same Adam step on ``ln w`` (see
:class:`papo_kernels.DAROWeights` for the objective and its sign convention), and rank 0's weights are broadcast.
"""

from __future__ import annotations

import torch
from accelerate.utils import broadcast

from papo_kernels import DAROWeights
from papo_kernels.daro import bucket_loss_stats, sequence_buckets


class DAROState:
    """What ``PAPOTrainer`` keeps for DARO (``advantage_estimator="daro"``): the learnable weights
    (:class:`papo_kernels.DAROWeights`), their Adam optimiser and this optimiser step's per-bucket loss sums and
    token counts; checkpointed with :meth:`state_dict`."""

    def __init__(self, G: int, *, learning_rate: float, init_weight: float, max_weight: float, device):
        self.G = G
        self.weights = DAROWeights(G, init_weight=init_weight, max_weight=max_weight).to(device)
        self.optimizer = torch.optim.Adam(self.weights.parameters(), lr=learning_rate)
        self._reset()

    def _reset(self) -> None:
        device = self.weights.log_weights.device
        self.loss_sum = torch.zeros(self.G + 1, dtype=torch.float64, device=device)
        self.tokens = torch.zeros_like(self.loss_sum)

    def annotate(self, correct: torch.Tensor, row_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of the gathered batch: its group's bucket ``k`` and that bucket's total token count ``T_k``."""
        return sequence_buckets(correct, row_tokens, self.G)

    def sequence_scale(self, buckets: torch.Tensor, bucket_tokens: torch.Tensor, factor: float) -> torch.Tensor:
        """``factor * w_k / T_k`` per sequence (0 for the buckets ``k = 0, G``)."""
        return self.weights.sequence_scale(buckets, bucket_tokens) * factor

    def accumulate(self, sequence_loss: torch.Tensor, sequence_tokens: torch.Tensor, buckets: torch.Tensor) -> None:
        loss, tokens = bucket_loss_stats(sequence_loss, sequence_tokens, buckets.to(sequence_loss.device), self.G)
        self.loss_sum += loss.to(self.loss_sum.device)
        self.tokens += tokens.to(self.tokens.device)

    def step(self, accelerator) -> dict[str, float]:
        """One update of the weights from this step's statistics (all processes); returns the metrics to log."""
        stats = accelerator.reduce(torch.stack([self.loss_sum, self.tokens]), reduction="sum")
        self.optimizer.zero_grad()
        objective = self.weights(stats[0], stats[1])
        objective.backward()
        self.optimizer.step()
        self.weights.clamp_()
        with torch.no_grad():
            self.weights.log_weights.copy_(broadcast(self.weights.log_weights.detach().clone(), from_process=0))
        metrics = {"daro/objective": objective.item()}
        w = self.weights.bucket_weights()
        for k in range(1, self.G):
            metrics[f"daro/weight_k{k}"] = w[k].item()
            present = stats[1, k] > 0
            metrics[f"daro/loss_k{k}"] = (stats[0, k] / stats[1, k]).item() if present else float("nan")
        self._reset()
        return metrics

    def state_dict(self) -> dict:
        return {"weights": self.weights.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
