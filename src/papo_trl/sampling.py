"""DAPO dynamic sampling: fresh prompts for extra generation rounds, and re-balancing the kept rows over processes.

Every decision is taken on tensors gathered across processes (identical everywhere), so all processes run the
same number of rounds and the same collectives: nothing can hang.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# per-row tensors of TRL's generation output: (pad side, pad value); None pads with the tokenizer's pad id
ROW_PADDING: dict[str, tuple[str, float | None]] = {
    "prompt_ids": ("left", None),
    "prompt_mask": ("left", 0),
    "completion_ids": ("right", None),
    "completion_mask": ("right", 0),
    "tool_mask": ("right", 1),
    "old_per_token_logps": ("right", 0.0),
    "ref_per_token_logps": ("right", 0.0),
    "sampling_per_token_logps": ("right", 0.0),
    "importance_sampling_ratio": ("right", 0.0),
    "advantages": ("right", 0.0),
}
SCALARS = ("num_items_in_batch",)


class PromptStream:
    """Prompts for the extra rounds: a seeded permutation of the dataset per epoch, ``num_prompts`` per batch,
    each repeated ``G`` times; every process walks the same global order and takes its contiguous share of the
    ``num_prompts * G`` rows, as TRL's ``RepeatSampler`` and accelerate's sharding lay out a generation batch.

    The seeds differ from the main sampler's, so the extra prompts are a second, independent stream over the data.
    ``state_dict``/``load_state_dict`` make a resumed run continue the stream where it stopped.
    """

    SEED_STRIDE = 7919

    def __init__(
        self,
        dataset,
        num_prompts: int,
        G: int,
        *,
        seed: int,
        process_index: int,
        num_processes: int,
        collate: Callable[[list], list] = list,
    ):
        if len(dataset) < num_prompts:
            raise ValueError(
                f"dynamic sampling needs at least {num_prompts} prompts in `train_dataset`, got {len(dataset)}"
            )
        self.dataset, self.num_prompts, self.G, self.seed = dataset, num_prompts, G, seed
        self.process_index, self.num_processes, self.collate = process_index, num_processes, collate
        self.drawn = 0

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.SEED_STRIDE * (epoch + 1))
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def next_batch(self) -> list:
        per_epoch = len(self.dataset) // self.num_prompts
        epoch, batch = divmod(self.drawn, per_epoch)
        self.drawn += 1
        prompts = self._order(epoch)[batch * self.num_prompts : (batch + 1) * self.num_prompts]
        rows = [i for i in prompts for _ in range(self.G)]
        local = len(rows) // self.num_processes
        mine = rows[self.process_index * local : (self.process_index + 1) * local]
        return self.collate([self.dataset[i] for i in mine])

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])


def check_row_keys(batch: dict) -> None:
    """Dynamic sampling re-balances text batches only; anything else in TRL's output is refused by name."""
    unknown = sorted(k for k, v in batch.items() if v is not None and k not in ROW_PADDING and k not in SCALARS)
    if unknown:
        raise ValueError(
            f"`dynamic_sampling=True` supports text-only batches; the generation batch also holds {unknown} "
            "(multimodal inputs): disable dynamic sampling for this dataset"
        )


def _pad_to(t: torch.Tensor, width: int, side: str, value: float) -> torch.Tensor:
    if t.shape[1] >= width:
        return t
    pad = t.new_full((t.shape[0], width - t.shape[1]), value)
    return torch.cat([pad, t] if side == "left" else [t, pad], dim=1)


def gather_rows(accelerator, batch: dict, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Every per-row tensor of this process's `batch`, padded to a common width and gathered over processes
    (process order, as TRL's ``gather`` of the rewards)."""
    out = {}
    for key, (side, value) in ROW_PADDING.items():
        t = batch.get(key)
        if t is None:
            continue
        value = pad_token_id if value is None else value
        if t.dim() == 2:
            t = accelerator.pad_across_processes(t, dim=1, pad_index=value, pad_first=side == "left")
        out[key] = accelerator.gather(t)
    return out


def concat_rows(batches: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenate the rows of several gathered batches (same keys), padding each tensor to the widest."""
    out = {}
    for key in batches[0]:
        side, value = ROW_PADDING[key]
        value = pad_token_id if value is None else value
        parts = [b[key] for b in batches]
        if parts[0].dim() == 2:
            width = max(p.shape[1] for p in parts)
            parts = [_pad_to(p, width, side, value) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    return out


def select_groups(keep: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `target` kept groups (in generation order), topped up with dropped groups when fewer were kept.

    Returns ``(groups[target], valid[target])``: ``valid`` is False for the top-up groups, which are masked out
    of the loss so the update uses the kept groups only.
    """
    kept = torch.nonzero(keep).flatten()[:target]
    filler = torch.nonzero(~keep).flatten()[: target - kept.numel()]
    groups = torch.cat([kept, filler])
    valid = torch.cat([torch.ones_like(kept, dtype=torch.bool), torch.zeros_like(filler, dtype=torch.bool)])
    return groups, valid


def group_rows(groups: torch.Tensor, G: int) -> torch.Tensor:
    """Row indices of `groups` (group-contiguous)."""
    return (groups[:, None] * G + torch.arange(G, device=groups.device)).reshape(-1)


def assemble_rounds(accelerator, rounds, target: int, G: int, pad_token_id: int):
    """The first `target` kept groups of the generation rounds (topped up with dropped groups, masked out of the
    loss), re-balanced so that each process holds an equal contiguous share, as TRL slices a batch.

    `rounds` are ``(local output, gathered rewards_per_func, gathered process or None, keep[num_groups])``.
    Returns ``(local output, rewards_per_func, process, valid, origin)`` where the last four are over the final
    global rows and ``origin`` indexes each final row among the rows of all rounds.
    """
    merged = concat_rows([gather_rows(accelerator, r[0], pad_token_id) for r in rounds], pad_token_id)
    groups, valid_groups = select_groups(torch.cat([r[3] for r in rounds]), target)
    origin = group_rows(groups, G)
    valid = valid_groups.repeat_interleave(G)
    rewards_per_func = torch.cat([r[1] for r in rounds])[origin]
    process = torch.cat([r[2] for r in rounds])[origin] if rounds[0][2] is not None else None
    n = origin.numel() // accelerator.num_processes
    local = slice(accelerator.process_index * n, (accelerator.process_index + 1) * n)
    output = {key: value[origin[local]] for key, value in merged.items()}
    for key in ("completion_mask", "tool_mask"):
        if key in output:
            output[key] = output[key] * valid[local, None].to(output[key].dtype)
    loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
    output["num_items_in_batch"] = accelerator.gather(loss_mask.sum()).sum()
    return output, rewards_per_func, process, valid, origin
