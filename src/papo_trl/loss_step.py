"""The loss half of :class:`~papo_trl.PAPOTrainer` (TRL 1.16's ``_compute_loss`` hook): the micro-batch loss through
``papo_kernels.loss`` - the fused linear-head loss inside the model's forward, or ``loss_from_logps`` on TRL's
per-token log-probs - with TRL's normalisation, DARO's per-bucket weights, and TRL's loss metrics."""

from __future__ import annotations

import torch
from trl.extras.profiling import profiling_context
from trl.trainer.utils import nanmax, nanmin

from papo_kernels.loss import LossInputs, logps_loss

from .fused_head import HeadLoss

__all__ = ["MULTIMODAL_KEYS", "PolicyLossStep"]

MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


class PolicyLossStep:
    """Mixin placed before ``GRPOTrainer``: ``_compute_loss`` falls back to TRL's own when neither the fused loss
    nor DARO applies."""

    def _compute_loss(self, model, inputs):
        """TRL's own loss, unless the fused loss computes it or DARO reweights it: :meth:`_compute_policy_loss`."""
        if not self._fused_loss and "daro_bucket" not in inputs:
            return super()._compute_loss(model, inputs)
        return self._compute_policy_loss(model, inputs)

    def _compute_policy_loss(self, model, inputs):
        """The micro-batch loss through ``papo_kernels.loss`` with TRL's normalisation: DARO's per-bucket weights
        when the batch carries them, else the ``loss_type`` aggregation with TRL's effective ``dapo`` normaliser;
        scaled for gradient accumulation, plus the MoE aux loss; TRL's metrics; DARO's weight update at the end of
        each optimiser step."""
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        # TRL's dapo normaliser is tokens / num_processes * accumulation / steps_per_generation; the accumulation
        # factor is applied to the whole loss (entropy bonus included) below
        factor = self.accelerator.num_processes * (self.args.steps_per_generation if mode == "train" else 1)
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        scale = None
        if "daro_bucket" in inputs:
            scale = self._daro.sequence_scale(inputs["daro_bucket"], inputs["daro_bucket_tokens"], factor)
        num_items = inputs["num_items_in_batch"].clamp(min=1.0) / factor
        output, aux_loss = self._policy_loss(model, inputs, mask, scale, num_items, 1.0 / accumulation)
        self._entropy_control.update(output.entropy_stats, mode, self.accelerator, self._metrics[mode])
        loss = output.loss / accumulation
        if aux_loss is not None and self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_loss_metrics(output, inputs, mask, mode)
        if scale is not None and mode == "train":
            self._daro.accumulate(output.sequence_loss, mask.sum(dim=1), inputs["daro_bucket"])
            if self.accelerator.sync_gradients:
                with profiling_context(self, "daro_step"):
                    daro_metrics = self._daro.step(self.accelerator)
                for key, value in daro_metrics.items():
                    self._metrics[mode][key].append(value)
        return loss

    def _policy_loss(self, model, inputs, mask, sequence_scale, num_items_in_batch, grad_scale=1.0):
        """The policy loss of a micro-batch as a ``PolicyLossOutput`` (and the MoE aux loss): the fused linear-head
        loss inside the model's forward (no logits materialised, gradients computed in the forward for the upstream
        gradient ``grad_scale``; with ``padding_free``, on the packed sequences) when enabled, else TRL's per-token
        log-probs (its chunked LM head; packed with ``padding_free``) and ``papo_kernels.loss.logps_loss``."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        use_is = self.use_vllm and self.vllm_importance_sampling_correction
        loss_inputs = LossInputs(
            mask, inputs["advantages"], old_logps=inputs.get("old_per_token_logps"),
            ref_logps=inputs.get("ref_per_token_logps"),
            importance_sampling_ratio=inputs.get("importance_sampling_ratio") if use_is else None,
            sampling_logps=inputs.get("sampling_per_token_logps"), num_items_in_batch=num_items_in_batch,
            sequence_scale=sequence_scale,
        )  # fmt: skip
        multimodal = {key: inputs.get(key) for key in MULTIMODAL_KEYS}
        config = self._entropy_control.loss_config(self._loss_config)
        if self._fused_loss and all(value is None for value in multimodal.values()):
            forward = dict(input_ids=input_ids, attention_mask=attention_mask)
            head_loss = HeadLoss(completion_ids, loss_inputs, config, grad_scale)
            rows = self._pack(model, input_ids, attention_mask, completion_ids.size(1))
            if rows is not None:  # packed rows, the completions only in the loss
                forward = dict(input_ids=rows.input_ids, position_ids=rows.position_ids)
                head_loss = HeadLoss(rows.completions(completion_ids), rows.loss_inputs(loss_inputs), config,
                                     grad_scale, rows.predict)  # fmt: skip
            with self.accelerator.autocast():
                return model(**forward, policy_loss=head_loss)
        logps, entropy, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **multimodal,
        )  # fmt: skip
        return logps_loss(logps, entropy, loss_inputs, config), aux_loss

    def _log_loss_metrics(self, output, inputs, mask, mode: str) -> None:
        """The loss metrics TRL logs, under its names and with its reductions over processes: token-weighted means
        (sequence-weighted for per-sequence values: VESPO's weight, sequence-level clip fractions), ``policy_loss``
        with an entropy bonus only (``entropy_coef`` is logged by ``EntropyControl.update``), and the extreme
        per-sequence clip fractions."""
        output.check()  # the kernels' flag for target ids outside the vocabulary (logging synchronises anyway)
        sequence_level = self._loss_config.importance_sampling_level == "sequence"
        count = mask.sum().float()
        for key, value in output.metrics.items():
            if key == "policy_loss" and not self._entropy_bonus_enabled:
                continue
            weight = torch.ones_like(count) if key == "policy_loss" else count
            if key == "vespo/phi_seq_mean" or (sequence_level and "clip_ratio" in key):  # one value per sequence
                weight = torch.full_like(count, mask.shape[0])
            totals = self.accelerator.reduce(torch.stack([value.float() * weight, weight]), reduction="sum")
            self._metrics[mode][key].append((totals[0] / totals[1].clamp(min=1.0)).item())
        if output.sequence_clip_ratio is not None:
            low, high = output.sequence_clip_ratio.unbind(-1)
            self._metrics[mode]["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(low)).item())
            self._metrics[mode]["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(high)).item())
