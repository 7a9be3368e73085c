"""grpo_kernels: a fused GRPO loss core for PyTorch.

One pass over the logits computes per-token log-probs, entropy, the clipped importance-ratio loss and
the KL penalty, without materialising the full-vocabulary softmax. See README.md and SPEC.md.
"""

from .api import GRPOLoss, GRPOLossOutput, group_advantages, grpo_loss, grpo_loss_with_config, token_logprobs
from .backends import BackendUnavailableError, available_backends
from .config import GRPOConfig

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "GRPOConfig",
    "GRPOLoss",
    "GRPOLossOutput",
    "available_backends",
    "group_advantages",
    "grpo_loss",
    "grpo_loss_with_config",
    "token_logprobs",
    "__version__",
]
