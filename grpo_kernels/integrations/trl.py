"""TRL drop-in: ``GRPOKernelsTrainer`` is TRL's ``GRPOTrainer`` with its loss computed by grpo_kernels.

    from grpo_kernels.integrations.trl import GRPOKernelsTrainer
    trainer = GRPOKernelsTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=..., backend="auto")
    trainer.train()

Everything but the loss is TRL's own code: generation, rewards, advantages, the old and reference
log-probs, gradient accumulation, logging. One method is overridden, ``_compute_loss(model, inputs)``,
the hook TRL's ``compute_loss`` calls for every micro-batch: it runs the model to get the completion logits
(``logits_to_keep = T + 1``, a view, no copy) and gives them to :func:`grpo_kernels.grpo_loss_with_config`,
with the loss options read from the trainer's ``GRPOConfig`` and TRL's normalisers:

- dapo / cispo: ``num_items_in_batch`` = the completion tokens of the whole generation batch over all
  processes (TRL's ``inputs["num_items_in_batch"]``), divided by the number of processes (the gradients
  are averaged over processes) and, in training, rescaled from the generation batch to one accumulation
  window (``* gradient_accumulation_steps / steps_per_generation``), exactly as TRL does;
- grpo / bnpo / dr_grpo / sapo: per-micro-batch means divided by the gradient-accumulation steps.

TRL options with no counterpart in grpo_kernels (vespo and luspo losses, the top-entropy token mask,
off-policy sequence masking, the entropy bonus, vLLM importance-sampling correction, MoE aux loss,
multimodal inputs) raise ``ValueError`` at construction or on the first batch; nothing falls back silently.
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from ..api import grpo_loss_with_config
from ..backends import check_backend_name
from ..config import LOSS_TYPES
from ..config import GRPOConfig as LossConfig

# Inputs of vision-language models; the adapter handles text-only causal LMs.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                    "mm_token_type_ids", "image_position_ids", "spatial_shapes", "num_tiles")


class GRPOKernelsTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is ``grpo_kernels.grpo_loss`` (``backend``: "auto", "cuda", ...)."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        check_backend_name(backend)
        super().__init__(*args, **kwargs)
        self.grpo_kernels_backend = backend
        a = self.args
        unsupported = {
            "loss_type": (self.loss_type not in LOSS_TYPES, f"{self.loss_type!r} (supported: {LOSS_TYPES})"),
            "top_entropy_quantile": (self.top_entropy_quantile < 1.0, f"{self.top_entropy_quantile} (only 1.0)"),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold is not None, "set (only None)"),
            "entropy bonus": (self._entropy_bonus_enabled, "enabled (entropy_coef must be 0, no adaptive entropy)"),
            "vllm_importance_sampling_correction": (
                self.use_vllm and self.vllm_importance_sampling_correction, "on with use_vllm (not supported)"),
            "router_aux_loss_coef": (self.aux_loss_enabled, "MoE aux loss enabled (not supported)"),
        }
        for name, (bad, what) in unsupported.items():
            if bad:
                raise ValueError(f"GRPOKernelsTrainer: TRL option {name} = {what}; use trl.GRPOTrainer for it")
        # The loss options, read once from TRL's config (the same defaults: grpo_kernels follows TRL).
        self.loss_config = LossConfig(
            beta=float(self.beta), epsilon_low=float(self.epsilon_low), epsilon_high=float(self.epsilon_high),
            delta=a.delta, temperature=float(self.temperature), loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level, use_bias_correction_kl=a.use_bias_correction_kl,
            sapo_temperature_pos=float(a.sapo_temperature_pos), sapo_temperature_neg=float(a.sapo_temperature_neg),
        )

    def _compute_loss(self, model, inputs):
        for key in _MULTIMODAL_KEYS:
            if inputs.get(key) is not None:
                raise ValueError(f"GRPOKernelsTrainer handles text-only models; the batch has {key!r}")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        T = completion_ids.size(1)
        with self.accelerator.autocast():
            # Without fused_lm_head=True TRL's patched forward is the model's own: logits of the last T+1
            # positions [B, T+1, V]; position t predicts completion token t.
            logits = model(
                input_ids=torch.cat([prompt_ids, completion_ids], 1),
                attention_mask=torch.cat([prompt_mask, completion_mask], 1),
                logits_to_keep=T + 1,
            ).logits[:, :-1]

        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1
        num_items = None
        if self.loss_type in ("dapo", "cispo"):
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if training:
                num_items = num_items * accumulation / self.args.steps_per_generation
        out = grpo_loss_with_config(
            logits, completion_ids, self.loss_config, completion_mask=mask, advantages=inputs["advantages"],
            old_logps=inputs.get("old_per_token_logps"), ref_logps=inputs.get("ref_per_token_logps"),
            max_completion_length=self.max_completion_length, num_items_in_batch=num_items,
            backend=self.grpo_kernels_backend,
        )
        loss = out.loss if self.loss_type in ("dapo", "cispo") else out.loss / accumulation
        self._log_loss_metrics(out.metrics, mask)
        return loss

    def _log_loss_metrics(self, metrics, mask):
        """TRL's metric names, averaged over processes weighted by their token (or sequence) counts."""
        mode = "train" if self.model.training else "eval"
        sequences = torch.tensor(float(mask.shape[0]), device=mask.device)
        tokens = mask.sum().float()
        for name, value in metrics.items():
            per_sequence = name.startswith(("clip_ratio", "cispo")) and self.importance_sampling_level == "sequence"
            weight = sequences if per_sequence else tokens
            totals = self.accelerator.reduce(torch.stack([value * weight, weight]), reduction="sum")
            self._metrics[mode][name].append((totals[0] / totals[1].clamp(min=1.0)).item())
