"""grpo_kernels: a fused GRPO loss core for PyTorch.

One pass over the logits computes per-token log-probs, entropy, the clipped importance-ratio loss and
the KL penalty, without materialising the full-vocabulary softmax; the loss follows TRL's GRPOTrainer.

- :func:`grpo_loss` / :class:`GRPOLoss` (logits in), :func:`fused_linear_grpo_loss` /
  :class:`FusedLinearGRPOLoss` (hidden states and LM head in), ``vocab_parallel.grpo_loss`` (logits sharded
  over the vocabulary); ``*_with_config`` take the options as one :class:`GRPOConfig` or ``trl.GRPOConfig``.
- :func:`token_logprobs`, :func:`group_advantages`, :func:`available_backends`.

``help()`` on each documents its parameters, defaults, shapes and outputs.
"""

from . import vocab_parallel  # vocab_parallel.token_logprobs / .grpo_loss over torch.distributed
from .api import (
    GRPOLoss,
    GRPOLossOutput,
    group_advantages,
    grpo_loss,
    grpo_loss_with_config,
    sampler_importance_ratio,
    token_logprobs,
)
from .backends import BackendUnavailableError, available_backends
from ._diagnostics import show_config
from .config import GRPOConfig
from .fused_linear import (
    FusedLinearGRPOLoss,
    fused_linear_grpo_loss,
    fused_linear_grpo_loss_with_config,
    fused_linear_token_logprobs,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FusedLinearGRPOLoss",
    "GRPOConfig",
    "GRPOLoss",
    "GRPOLossOutput",
    "available_backends",
    "fused_linear_grpo_loss",
    "fused_linear_grpo_loss_with_config",
    "fused_linear_token_logprobs",
    "group_advantages",
    "grpo_loss",
    "grpo_loss_with_config",
    "sampler_importance_ratio",
    "show_config",
    "token_logprobs",
    "vocab_parallel",
    "__version__",
]
