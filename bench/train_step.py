"""Benchmark of one training step of a tiny causal LM: model forward + GRPO loss, then backward.

    python -m bench.train_step --n 2048 --v 32000 --dtype bf16
    python -m bench.train_step --n 2048 --v 32000 --hidden 256 --layers 2 --impls trl,cpu

The model (defined here, no download): embedding [V, H], ``--layers`` pre-norm MLP blocks (H -> 4H -> H,
residual), a final LayerNorm and an LM head [V, H] without bias, in ``--dtype``. A batch is B sequences
of P prompt + T completion tokens (N = B*T completion tokens); the loss sees the completion logits as the
view ``logits[:, P-1:-1]``, as a GRPO trainer does. What differs between rows is only the loss:

- ``trl``: TRL 1.16's ``GRPOTrainer._compute_loss`` on the same logits view, log-probs and entropy from
  TRL's ``selective_log_softmax_and_entropy`` (see :mod:`bench._trl`);
- ``trl_fused_head``: TRL 1.16 as its trainer runs by default: ``_compute_loss`` with TRL's own
  ``_get_per_token_logps_and_entropies``, the model patched by TRL's ``add_fused_lm_head`` (its LM head is
  ``ChunkedLogProbFunction`` on the hidden states: the [B, P+T, V] logits are never materialised);
- every fused backend: ``grpo_kernels.grpo_loss(logits view, backend=...)``; ``<backend>_inplace`` with
  ``inplace=True`` (the gradient overwrites the model's logits, which nothing else needs);
- ``compile``: ``torch.compile(grpo_kernels.reference.grpo_loss)`` on the same logits view (the model
  itself stays eager in every row);
- ``reference``: ``grpo_kernels.grpo_loss(backend="torch")``, the float64-capable reference (a correctness
  tool, not what users run);
- ``liger_chunked``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (its default ``compiled=True``) on the
  hidden states and the LM head weight, which never materialises the [B, P+T, V] logits: on the CPU this
  is Liger's only GRPO path;
- ``fused_linear``: ``grpo_kernels.fused_linear_grpo_loss`` when the package has it.

Loss options as in ``bench.loss`` (dapo, beta 0.04 with reference log-probs, old log-probs near the
current ones). No optimizer step: forward + backward is the part the loss changes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch
from torch import nn

import grpo_kernels
from grpo_kernels import reference
from grpo_kernels.config import GRPOConfig

from . import _trl, runner
from .loss import FUSED, TRL_NOTE, batch_shape, fused_backends, inplace_rows

NAME = "train_step"


class TinyLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, H]
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> logits [B, S, V]
        return self.lm_head(self.hidden_states(input_ids))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t", type=int, default=256, help="T completion tokens per sequence (B = N / T)")
    p.add_argument("--prompt", type=int, default=16, help="P prompt tokens per sequence")
    p.add_argument("--hidden", type=int, default=256, help="H hidden size of the tiny model")
    p.add_argument("--layers", type=int, default=2, help="MLP blocks of the tiny model")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no KL term)")
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--temperature", type=float, default=1.0)


def config(args) -> GRPOConfig:
    return GRPOConfig(beta=args.beta, loss_type=args.loss_type, temperature=args.temperature)


def make_inputs(args, device: torch.device) -> dict:
    B, T = batch_shape(args.n, args.t)
    P = args.prompt
    if P < 1:
        raise ValueError(f"--prompt must be >= 1, got {P}")
    torch.manual_seed(args.seed)
    model = TinyLM(args.v, args.hidden, args.layers).to(device=device, dtype=runner.DTYPES[args.dtype])
    g = torch.Generator(device=device).manual_seed(args.seed)
    input_ids = torch.randint(0, args.v, (B, P + T), device=device, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device, generator=g)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    with torch.no_grad():
        logp = reference.token_logprobs(model(input_ids)[:, P - 1 : -1], input_ids[:, P:], args.temperature)
    return {
        "model": model, "input_ids": input_ids, "ids": input_ids[:, P:].contiguous(), "mask": mask, "P": P,
        "advantages": torch.randn(B, device=device, generator=g),
        "old_logps": (logp + 0.3 * torch.randn(B, T, device=device, generator=g)).contiguous(),
        "ref_logps": (logp + 0.1 * torch.randn(B, T, device=device, generator=g)).contiguous() if args.beta else None,
    }


def implementations(args, device: torch.device) -> list:
    if importlib.util.find_spec("liger_kernel") is None:
        liger = "liger-kernel is not installed (pip install liger-kernel --no-deps)"
    else:
        liger = None
    fl = None if hasattr(grpo_kernels, "fused_linear_grpo_loss") else \
        "grpo_kernels.fused_linear_grpo_loss is not in this version of the package"
    trl = _trl.missing_reason()
    return [("trl", trl), ("trl_fused_head", trl), ("compile", None), ("liger_chunked", liger),
            *fused_backends(device), *inplace_rows(device), ("fused_linear", fl), ("reference", None)]


def work(args):
    return None  # the step is dominated by the model's matmuls; no streaming floor applies


def build(impl: str, x: dict, args) -> runner.Case:
    model, cfg, P = x["model"], config(args), x["P"]
    leaves = list(model.parameters())
    backward = lambda loss: loss.backward()  # noqa: E731
    common = dict(completion_mask=x["mask"], advantages=x["advantages"], old_logps=x["old_logps"],
                  ref_logps=x["ref_logps"], beta=args.beta, loss_type=args.loss_type, temperature=args.temperature)
    if impl == "reference" or impl in FUSED:
        backend = "torch" if impl == "reference" else impl
        return runner.Case(
            lambda: grpo_kernels.grpo_loss(model(x["input_ids"])[:, P - 1 : -1], x["ids"], backend=backend,
                                           **common).loss,
            backward, leaves, f"model + grpo_kernels.grpo_loss(backend={backend!r})" + (
                ": the reference, not what users run" if impl == "reference" else ""))
    if impl.endswith("_inplace") and impl[: -len("_inplace")] in FUSED:
        backend = impl[: -len("_inplace")]
        return runner.Case(
            lambda: grpo_kernels.grpo_loss(model(x["input_ids"])[:, P - 1 : -1], x["ids"], backend=backend,
                                           inplace=True, **common).loss,
            backward, leaves, f"model + grpo_kernels.grpo_loss(backend={backend!r}, inplace=True)")
    if impl == "trl":
        trainer = _trl.trainer_on_logits(cfg, lambda: model(x["input_ids"])[:, P - 1 : -1], x["ids"], x["mask"])
        batch = _trl.loss_inputs(x["ids"], x["mask"], x["advantages"], x["old_logps"], x["ref_logps"])
        return runner.Case(lambda: trainer._compute_loss(None, batch), backward, leaves, "model + " + TRL_NOTE)
    if impl == "trl_fused_head":
        view = _trl.CausalLMView(model.hidden_states, model.lm_head, model)
        trainer = _trl.trainer_on_model(cfg, view, x["ids"].shape[1])
        batch = _trl.loss_inputs(x["ids"], x["mask"], x["advantages"], x["old_logps"], x["ref_logps"],
                                 prompt_ids=x["input_ids"][:, :P])
        return runner.Case(lambda: trainer._compute_loss(view, batch), backward, leaves,
                           "TRL 1.16 GRPOTrainer._compute_loss with its own _get_per_token_logps_and_entropies, the "
                           "model patched by trl add_fused_lm_head (ChunkedLogProbFunction on the hidden states)")
    if impl == "compile":
        fn = torch.compile(reference.grpo_loss, dynamic=False)
        return runner.Case(
            lambda: fn(model(x["input_ids"])[:, P - 1 : -1], x["ids"], cfg, x["advantages"], x["mask"],
                       x["old_logps"], x["ref_logps"])[0],
            backward, leaves, "model + torch.compile(grpo_kernels.reference.grpo_loss)")
    if impl == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss_fn = LigerFusedLinearGRPOLoss(
            beta=args.beta, use_ref_model=bool(args.beta), epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.resolved_epsilon_high, loss_type=args.loss_type, temperature=args.temperature,
            use_bias_correction_kl=cfg.use_bias_correction_kl)
        return runner.Case(
            lambda: loss_fn(model.hidden_states(x["input_ids"])[:, P - 1 : -1], model.lm_head.weight, x["ids"],
                            x["mask"], x["advantages"], ref_per_token_logps=x["ref_logps"],
                            old_per_token_logps=x["old_logps"])[0],
            backward, leaves, "model trunk + liger_kernel LigerFusedLinearGRPOLoss(compiled=True, chunk_size=1) "
                              "on hidden states and the LM head weight")
    if impl == "fused_linear":
        return runner.Case(
            lambda: grpo_kernels.fused_linear_grpo_loss(
                model.hidden_states(x["input_ids"])[:, P - 1 : -1], model.lm_head.weight, x["ids"], **common).loss,
            backward, leaves, "model trunk + grpo_kernels.fused_linear_grpo_loss on hidden states and the LM head")
    raise ValueError(f"unknown implementation {impl!r}")


def main(argv=None) -> dict:
    return runner.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
