"""TRL 1.16's own GRPO loss code, called for real, for the ``trl`` rows of the benchmarks.

What a TRL user runs is ``GRPOTrainer._compute_loss``: per-token log-probs and entropies from
``_get_per_token_logps_and_entropies``, then the loss terms (importance ratio, clipping, KL, the loss type's
normalisation) and the logged metrics (KL, entropy, clip ratios: each a ``.item()``). Here that method runs on
a ``GRPOTrainer`` instance built without ``__init__``, carrying only the state ``_compute_loss`` reads (one
process, no gradient accumulation, no vLLM, no entropy mask or bonus, training mode). The log-probs come from
TRL's own functions at one of two levels:

- logits: :func:`trainer_on_logits` replaces ``_get_per_token_logps_and_entropies`` with TRL's
  ``selective_log_softmax_and_entropy`` on given logits (entropy without gradient, as the loss does not
  differentiate it). On CPU tensors that function is ``selective_log_softmax`` followed by
  ``entropy_from_logits``; on CUDA it is TRL's one-pass Triton kernel.
- hidden states: :func:`trainer_on_model` keeps TRL's real ``_get_per_token_logps_and_entropies``, which calls
  the model with ``fused_lm_head=True``; the model is patched by TRL's ``add_fused_lm_head``, whose LM head is
  ``ChunkedLogProbFunction`` (the [N, V] logits are never materialised).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import types

import torch
from torch import nn

from grpo_kernels.config import GRPOConfig


def missing_reason() -> str | None:
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install 'trl>=1.16', or the bench extra)"
    return None


class OneProcessAccelerator:
    """What ``_compute_loss`` asks of accelerate in a single process: identity reductions, no autocast."""

    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t

    def autocast(self):
        return contextlib.nullcontext()


def make_trainer(cfg: GRPOConfig, max_completion_length: int, model: nn.Module):
    """A ``trl.GRPOTrainer`` with exactly the state ``_compute_loss`` reads, the options of ``cfg``."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    t = object.__new__(GRPOTrainer)
    args = types.SimpleNamespace(use_bias_correction_kl=cfg.use_bias_correction_kl, delta=cfg.delta,
                                 sapo_temperature_pos=cfg.sapo_temperature_pos,
                                 sapo_temperature_neg=cfg.sapo_temperature_neg, steps_per_generation=1)
    state = dict(
        args=args, loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level, beta=cfg.beta,
        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.resolved_epsilon_high,
        max_completion_length=max_completion_length,
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, model=model, current_gradient_accumulation_steps=1,
        accelerator=OneProcessAccelerator(), _entropy_bonus_enabled=False, temperature=cfg.temperature,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )
    for k, v in state.items():
        setattr(t, k, v)
    return t


def loss_inputs(completion_ids, completion_mask, advantages, old_logps, ref_logps, prompt_ids=None) -> dict:
    """The batch dict ``_compute_loss`` reads (masks as integer tensors, as TRL's generation hands them over).

    ``num_items_in_batch`` is the number of unmasked tokens: dapo / cispo then normalise by the batch's own
    tokens, as grpo_kernels does by default."""
    B = completion_ids.shape[0]
    mask = completion_mask.to(torch.long)
    if prompt_ids is None:
        prompt_ids = torch.zeros(B, 1, dtype=torch.long, device=completion_ids.device)
    x = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
             completion_mask=mask, advantages=advantages, num_items_in_batch=mask.sum())
    if old_logps is not None:
        x["old_per_token_logps"] = old_logps
    if ref_logps is not None:
        x["ref_per_token_logps"] = ref_logps
    return x


def trainer_on_logits(cfg: GRPOConfig, logits_fn, completion_ids, completion_mask):
    """-> trainer whose ``_compute_loss(None, inputs)`` takes its log-probs from ``logits_fn()`` ([B, T, V],
    called inside the loss, so a model forward or a slice there is timed with it) through TRL's functions."""
    from trl.trainer.utils import selective_log_softmax_and_entropy

    trainer = make_trainer(cfg, completion_ids.shape[1], nn.Module())
    row_mask = completion_mask.to(torch.long)

    def logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **kw):
        logps, ent = selective_log_softmax_and_entropy(logits_fn(), completion_ids, entropy_requires_grad=False,
                                                       temperature=cfg.temperature, row_mask=row_mask)
        return logps, (ent if compute_entropy else None), None

    trainer._get_per_token_logps_and_entropies = types.MethodType(logps_and_entropies, trainer)
    return trainer


class _Backbone(nn.Module):
    def __init__(self, hidden_states_fn):
        super().__init__()
        self.fn = hidden_states_fn

    def forward(self, input_ids=None, attention_mask=None, **kw):
        return types.SimpleNamespace(last_hidden_state=self.fn(input_ids))


class CausalLMView(nn.Module):
    """The interface ``add_fused_lm_head`` patches, over a model given as two callables: ``hidden_states(ids)``
    ([B, S, H], the final norm applied) and its LM head (an ``nn.Linear``). No parameters are copied."""

    def __init__(self, hidden_states_fn, lm_head: nn.Linear, logits_fn):
        super().__init__()
        import transformers

        self.config = transformers.PretrainedConfig()
        self._backbone = _Backbone(hidden_states_fn)
        self._lm_head = lm_head
        self._logits_fn = logits_fn

    @property
    def base_model(self):
        return self._backbone

    def get_output_embeddings(self):
        return self._lm_head

    def forward(self, input_ids=None, attention_mask=None, **kw):
        return types.SimpleNamespace(logits=self._logits_fn(input_ids))


def trainer_on_model(cfg: GRPOConfig, view: CausalLMView, max_completion_length: int):
    """-> trainer whose ``_compute_loss(view, inputs)`` runs TRL's real ``_get_per_token_logps_and_entropies``
    on ``view`` patched by TRL's ``add_fused_lm_head`` (log-probs and entropy from ``ChunkedLogProbFunction``)."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(view, temperature=cfg.temperature, outputs=("log_probs", "entropy"))
    return make_trainer(cfg, max_completion_length, view)
