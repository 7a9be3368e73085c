"""The oracle of every test: backend "torch" on float64 inputs.

Called on float64 tensors these functions compute in float64, and every kernel, every backend and the TRL
adapter is tested against them:

- :func:`token_logprobs`: log-probs and entropies by the full-vocabulary log-softmax;
- :func:`grpo_loss`: the loss from logits, autograd of the runtime loss on log-probs
  (:func:`grpo_kernels.logp_loss.loss_from_logps`) applied to those float64 log-probs.

They are the functions backend "torch" runs (:mod:`grpo_kernels.eager`), so the oracle is the eager path a
user can select, not a second copy of it. Only tests and benchmarks import this module; the library itself
imports :mod:`grpo_kernels.eager` and :mod:`grpo_kernels.logp_loss`.
"""

from __future__ import annotations

from .eager import grpo_loss, token_logprobs

__all__ = ["grpo_loss", "token_logprobs"]
