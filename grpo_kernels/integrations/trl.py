"""TRL drop-in: ``GRPOKernelsTrainer`` is TRL's ``GRPOTrainer`` with its LM head and loss computed by grpo_kernels.

    from grpo_kernels.integrations.trl import GRPOKernelsTrainer
    trainer = GRPOKernelsTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=..., backend="auto")
    trainer.train()

Generation, rewards, advantages, gradient accumulation and logging stay TRL's own code. What changes:

- The LM head. TRL patches the model so that ``model(..., labels=..., fused_lm_head=True)`` returns per-token
  log-probs from its chunked head; every log-prob pass of TRL (old policy, reference model, sampler
  correction) goes through that call inside ``_get_per_token_logps_and_entropies``. This trainer patches the
  same forward once more: with ``fused_lm_head=True`` it runs the model's backbone, takes the last hidden
  states of the completion positions only, and scores them with :func:`grpo_kernels.fused_linear_token_logprobs`
  (chunked: never the [B, T, V] logits). The forward is still entered through the wrapped model (DDP, FSDP2,
  PEFT), so their hooks run as for TRL; inputs of vision-language models reach the backbone exactly as TRL
  passes them; the head's ``logit_scale`` / ``final_logit_softcapping`` are read from the model config as TRL
  reads them; ``cast_lm_head_to_fp32`` runs the head in fp32 outside autocast, as TRL does. Sharded heads are
  gathered by :func:`_gathered_head`: an FSDP2 head that is its own unit with a backward that averages its
  gradient over the ranks (TRL's ``full_tensor()`` leaves each rank's shard its own batch's gradient), a DeepSpeed
  ZeRO-3 head TRL's way for the forward and again in backward. A PEFT LoRA adapter on ``lm_head`` (which TRL 1.16
  refuses) is applied in the streamed head, ``h W^T + s (h A^T) B^T`` per chunk.
- The loss. ``_compute_loss`` calls TRL's own ``_get_per_token_logps_and_entropies`` for the training forward
  (so multimodal inputs and MoE router logits are handled by TRL's code); inside the forward the hidden
  states go straight to :func:`grpo_kernels.fused_linear_grpo_loss_with_config`, which streams the head and
  computes the loss and its gradients chunk by chunk.
- The options are read from the trainer at every call (``self.beta``, ``self.epsilon_low``, ``self.args.delta``,
  ``self.entropy_coef``...), so callbacks that change them, and TRL's adaptive entropy coefficient, act as in
  TRL. The normalisers are TRL's: dapo / cispo / vespo divide by ``num_items_in_batch`` rescaled from the
  generation batch to one accumulation window; the others divide per-micro-batch means by the accumulation
  steps (not in eval).

With grad enabled, ``_get_per_token_logps_and_entropies`` returns differentiable log-probs and entropies, as
TRL's does (the streamed head's backward recomputes each chunk's logits). Everything TRL reduces or gathers
across processes is reduced the same way: the top-entropy quantile over the entropies of every process, the
metrics' weighted means and min / max, ``policy_loss``, the adaptive entropy controller's window, and
``num_items_in_batch``.

TRL options that the installed grpo_kernels cannot compute raise ``ValueError`` in ``__init__`` before the model
is loaded (see :func:`unsupported_options`).
"""

from __future__ import annotations

import functools
import sys
import types
import weakref
from contextlib import contextmanager, nullcontext

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer

from ..backends import check_backend_name
from ..config import LOSS_TYPE_TABLE, LOSS_TYPES
from ..config import GRPOConfig as LossConfig
from ..fused_linear import fused_linear_grpo_loss_with_config, fused_linear_token_logprobs


def unsupported_options(args) -> list[str]:
    """The TRL ``GRPOConfig`` options in ``args`` that this grpo_kernels cannot compute, each with its reason
    (empty when the trainer supports the configuration)."""
    bad = []
    if args.loss_type not in LOSS_TYPES:
        bad.append(f"loss_type = {args.loss_type!r} (this grpo_kernels computes {LOSS_TYPES})")
    return bad


def _head_transform(config) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) of a model config, looked up under the names TRL 1.16's fused
    head reads (Cohere's logit_scale, Granite's logits_scaling divisor, Falcon-H1's lm_head_multiplier...)."""
    text = config.get_text_config()
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), (None if cap is None else float(cap))


class _HeadJob:
    """What the patched forward computes on its next ``fused_lm_head=True`` call: the log-probs (and entropy)
    of the last ``keep`` positions, or, when ``loss_fn`` is set, the loss of those positions."""

    def __init__(self, keep: int, entropy: bool, loss_fn=None):
        self.keep, self.entropy, self.loss_fn = keep, entropy, loss_fn


class GRPOKernelsTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose LM head and loss are grpo_kernels' streamed ones.

    ``backend``: the grpo_kernels backend ("auto", "cuda", "triton", "cpu", "torch"); ``chunk_size``: rows of
    logits per chunk (None: from the memory budget of ``grpo_kernels.fused_linear.default_chunk_size``).
    """

    def __init__(self, *args, backend: str = "auto", chunk_size: int | None = None, **kwargs):
        check_backend_name(backend)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # None: TRL's defaults, all supported
            bad = unsupported_options(config)
            if bad:
                raise ValueError("GRPOKernelsTrainer cannot run these TRL options: " + "; ".join(bad)
                                 + ". Use trl.GRPOTrainer for them.")
        self.grpo_kernels_backend, self.grpo_kernels_chunk_size = backend, chunk_size
        self._gk_head_job = None
        with _allow_lm_head_adapter(config):
            super().__init__(*args, **kwargs)
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        _patch_forward(base, self)
        if self.ref_model is not None:
            _patch_forward(_inner_model(self.ref_model), self)

    # -- the log-prob passes --------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        """TRL's method as shipped; the patched forward scores only the last ``logits_to_keep`` positions."""
        compute_entropy = kw.get("compute_entropy", a[1] if len(a) > 1 else False)
        outer = self._gk_head_job
        if outer is None or outer.loss_fn is None:
            self._gk_head_job = _HeadJob(logits_to_keep, bool(compute_entropy))
        try:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                               *a, **kw)
        finally:
            self._gk_head_job = outer

    # -- the loss -------------------------------------------------------------------------------------
    def _loss_config(self, entropy_coef: float) -> LossConfig:
        a = self.args
        options = dict(
            beta=float(self.beta), epsilon_low=float(self.epsilon_low), epsilon_high=float(self.epsilon_high),
            delta=None if a.delta is None else float(a.delta), temperature=float(self.temperature),
            loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
            use_bias_correction_kl=bool(a.use_bias_correction_kl), sapo_temperature_pos=float(a.sapo_temperature_pos),
            sapo_temperature_neg=float(a.sapo_temperature_neg),
            vespo_k_pos=float(a.vespo_k_pos), vespo_lambda_pos=float(a.vespo_lambda_pos),
            vespo_k_neg=float(a.vespo_k_neg), vespo_lambda_neg=float(a.vespo_lambda_neg),
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            top_entropy_quantile=float(self.top_entropy_quantile), entropy_coef=float(entropy_coef),
        )
        return LossConfig(**options)

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        T = completion_ids.size(1)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1

        bad = unsupported_options(self.args)  # an option a callback switched on mid-run
        if bad:
            raise ValueError("GRPOKernelsTrainer cannot run these TRL options: " + "; ".join(bad))
        coef = 0.0
        if self._entropy_bonus_enabled:
            coef = self.entropy_coef
            if self.use_adaptive_entropy and not self._last_world_entropy <= self.args.entropy_target:
                coef = 0.0
        # Loss types normalised by num_items_in_batch (the dapo family) span every accumulation step already;
        # TRL divides the others' loss by the steps. TRL divides the entropy bonus by the steps for every loss
        # type: inside the dapo family's loss here, below for the others.
        global_norm = LOSS_TYPE_TABLE[self.loss_type].normaliser == "num_items"
        lib_coef = coef / accumulation if global_norm else coef
        config = self._loss_config(lib_coef)
        num_items = None
        if global_norm:
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation
        extra = {}
        if self.loss_type == "vespo" or (self.use_vllm and self.vllm_importance_sampling_correction):
            if inputs.get("importance_sampling_ratio") is not None:
                extra["importance_sampling_ratio"] = inputs["importance_sampling_ratio"]
        if self.off_policy_mask_threshold is not None and inputs.get("sampling_per_token_logps") is not None:
            extra["sampling_logps"] = inputs["sampling_per_token_logps"]
        if self.top_entropy_quantile < 1.0:
            extra["process_group"] = _quantile_group(self.accelerator)
        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")

        outputs = []

        def loss_fn(hidden, weight, bias, logit_scale, softcap, lora=None):
            out = fused_linear_grpo_loss_with_config(
                hidden, weight, completion_ids, config, lm_head_bias=bias, completion_mask=mask,
                advantages=advantages, old_logps=old, ref_logps=inputs.get("ref_per_token_logps"),
                max_completion_length=self.max_completion_length, num_items_in_batch=num_items,
                logit_scale=logit_scale, final_logit_softcapping=softcap, chunk_size=self.grpo_kernels_chunk_size,
                backend=self.grpo_kernels_backend, lora=lora, **extra,
            )
            outputs.append(out)
            return out

        self._gk_head_job = _HeadJob(T, False, loss_fn)
        try:
            _, _, aux_loss = self._get_per_token_logps_and_entropies(
                model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T,
                compute_entropy=False, compute_aux_loss=self.aux_loss_enabled,
                **{k: inputs.get(k) for k in _MULTIMODAL_KEYS},
            )
        finally:
            self._gk_head_job = None
        (out,) = outputs
        loss = out.loss if global_norm else out.loss / accumulation
        metrics = dict(out.metrics)
        # the loss's entropy-bonus outputs, read by TRL's policy_loss metric and adaptive controller (not logged)
        policy_loss = metrics.pop("policy_loss", None)
        bonus_stats = _bonus_entropy_stats(metrics, mask)

        if self._entropy_bonus_enabled:
            # the loss before the bonus and before the accumulation division, TRL's policy_loss (the loss
            # itself when the coefficient is 0 now)
            policy_loss = (out.loss if policy_loss is None else policy_loss).detach()
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                stats = bonus_stats.detach()
                self._entropy_window_stats = stats if self._entropy_window_stats is None else (
                    self._entropy_window_stats + stats)
                if self.accelerator.sync_gradients:
                    window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                    world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                    a = self.args
                    if world_entropy <= a.entropy_target:
                        self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                    else:
                        self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                    self._last_world_entropy = world_entropy
                    self._entropy_window_stats = None
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_loss_metrics(metrics, mask, mode)
        return loss

    def _log_loss_metrics(self, metrics, mask, mode):
        """TRL's metric names and cross-process reductions: token (or sequence) weighted means; the min / max
        over sequences of ``clip_ratio/low_min`` / ``clip_ratio/high_max`` over all processes."""
        sequences = torch.tensor(float(mask.shape[0]), device=mask.device)
        tokens = mask.sum().float()
        # TRL takes any [B, 1] tensor for one value per sequence: at T = 1 its token metrics too, averaged over
        # the B sequences and, for the min / max, with a completion that keeps no token counted as 0
        one_column = mask.shape[1] == 1
        for name, value in metrics.items():
            value = value.to(mask.device).float()
            if name.endswith("_min") or name.endswith("_max"):
                if one_column and self.importance_sampling_level == "token":
                    value = _with_empty_rows_as_zero(value, mask, name.endswith("_min"))
                gathered = self.accelerator.gather(value.reshape(1))
                gathered = gathered[~torch.isnan(gathered)]
                agg = (gathered.min() if name.endswith("_min") else gathered.max()) if gathered.numel() else value
                self._metrics[mode][name].append(agg.item())
                continue
            per_sequence = name == "vespo/phi_seq_mean" or (
                name.startswith(("clip_ratio", "cispo")) and self.importance_sampling_level == "sequence")
            weight = sequences if per_sequence else tokens
            count = sequences if one_column else weight
            totals = self.accelerator.reduce(torch.stack([value * weight, count]), reduction="sum")
            self._metrics[mode][name].append((totals[0] / totals[1].clamp(min=1.0)).item())


def _with_empty_rows_as_zero(value, mask, smallest: bool):
    """A min (or max) over sequences of a rate in [0, 1] with the rate 0 of every completion that keeps no token
    folded in (the loss skips those completions; TRL counts them when T = 1)."""
    if not bool((mask.sum(-1) == 0).any()):
        return value
    zero = torch.zeros_like(value)
    if torch.isnan(value):
        return zero
    return torch.minimum(value, zero) if smallest else torch.maximum(value, zero)


def _quantile_group(accelerator):
    """The process group over which TRL's get_high_entropy_mask takes the entropy quantile: every process
    (its accelerator.gather); None in a single process."""
    if accelerator.num_processes == 1:
        return None
    return torch.distributed.group.WORLD


def _bonus_entropy_stats(metrics: dict, mask) -> torch.Tensor:
    """[sum of entropy x weight, weight] over the tokens TRL's entropy bonus acts on (the completion mask, times
    the top-entropy mask when it is on), the micro-batch's share of TRL's adaptive-controller window. Pops the
    loss's two top-entropy metrics, which TRL does not log."""
    tokens = mask.sum().float()
    top, share = metrics.pop("top_entropy/entropy", None), metrics.pop("top_entropy/fraction", None)
    if top is None:
        return torch.stack([metrics["entropy"].to(tokens.device) * tokens, tokens])
    count = share.to(tokens.device) * tokens
    return torch.stack([top.to(tokens.device) * count, count])


# Inputs of vision-language models, passed by TRL's _get_per_token_logps_and_entropies to the model.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _patch_forward(model, trainer) -> None:
    """Routes ``model(..., labels=..., fused_lm_head=True)`` (TRL's log-prob call) through grpo_kernels' streamed
    head while the trainer has a pass pending; every other call goes to the forward TRL installed."""
    import transformers
    from packaging.version import Version
    from trl.trainer.utils import FusedCausalLMOutput

    previous = model.forward
    text_config = model.config.get_text_config()
    logit_scale, softcap = _head_transform(model.config)
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"
    trainer_ref = weakref.ref(trainer)

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, **kwargs):
        owner = trainer_ref()
        job = None if owner is None else owner._gk_head_job
        if not fused_lm_head or job is None:
            return previous(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_out = getattr(self, backbone_attr)(*args, **kwargs)
        hidden, ids = _scored_positions(backbone_out.last_hidden_state, labels, shift_labels, job.keep)
        lm_head = self.get_output_embeddings()
        hidden, ids = hidden.to(_head_device(lm_head)), ids.to(_head_device(lm_head))
        fp32 = owner.args.cast_lm_head_to_fp32
        ctx = torch.autocast(hidden.device.type, enabled=False) if fp32 else nullcontext()
        if fp32:
            hidden = hidden.float()
        loss = entropy = valid = None
        with ctx, _gathered_head(lm_head) as (weight, bias, lora):
            if job.loss_fn is not None:
                out = job.loss_fn(hidden, weight, bias, logit_scale, softcap, lora)
                loss, log_probs = out.loss, out.logps
            else:
                valid = ids != -100
                res = fused_linear_token_logprobs(
                    hidden, weight, ids.clamp(min=0), bias=bias, temperature=float(owner.temperature),
                    return_entropy=job.entropy, logit_scale=logit_scale, final_logit_softcapping=softcap,
                    chunk_size=owner.grpo_kernels_chunk_size, backend=owner.grpo_kernels_backend, lora=lora)
                log_probs, entropy = res if job.entropy else (res, None)
                log_probs = log_probs.masked_fill(~valid, 0.0)
                entropy = None if entropy is None else entropy.masked_fill(~valid, 0.0)
                # TRL's head returns the mean negative log-likelihood of the scored labels as its loss
                loss = -log_probs.sum() / (valid.sum().clamp(min=1) if num_items_in_batch is None
                                           else num_items_in_batch)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(self, text_config, backbone_out, kwargs.get("attention_mask"))
            if job.loss_fn is None:
                loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=valid,
                                   aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)


def _scored_positions(last_hidden_state, labels, shift_labels, keep: int):
    """(hidden [B, keep, H], label ids [B, keep]) of the last ``keep`` scored positions, as TRL's fused head
    pairs them: a label is predicted by the hidden state one step before it; pre-shifted ``shift_labels``
    (context / sequence parallelism) are paired with the hidden state at their own position."""
    if shift_labels is None:
        return last_hidden_state[:, -keep - 1:-1], labels[:, -keep:]
    return last_hidden_state[:, -keep:], shift_labels[:, -keep:]


@contextmanager
def _allow_lm_head_adapter(args):
    """TRL 1.16 refuses a PEFT adapter on ``lm_head`` because its fused head reads ``lm_head.weight`` alone and would
    never train the adapter; the streamed head here applies it (see :func:`_head_adapter`), so the refusal is
    lifted while TRL's ``__init__`` runs. With ``cast_lm_head_to_fp32`` TRL's own refusal stays."""
    import trl.trainer.grpo_trainer as grpo_module

    original = getattr(grpo_module, "BaseTunerLayer", None)
    if original is None or (args is not None and args.cast_lm_head_to_fp32):
        yield
        return

    class _NoHeadAdapterCheck:  # isinstance(lm_head, ...) is False for every module
        pass

    grpo_module.BaseTunerLayer = _NoHeadAdapterCheck
    try:
        yield
    finally:
        grpo_module.BaseTunerLayer = original


# -- the LM head: which tensors the streamed head reads, gathered as the model is sharded ----------------------
def _head_device(lm_head) -> torch.device:
    return lm_head.weight.device


@contextmanager
def _gathered_head(lm_head):
    """(weight, bias, lora) of the model's LM head for the streamed head, for as long as the context lasts: plain
    full-size tensors, and ``lora`` = (A, B, scale) of a PEFT LoRA adapter on the head (None without one).

    - FSDP2, the head its own ``fully_shard`` unit: its forward never runs, so FSDP never unshards it nor
      reduce-scatters its gradient. The DTensor weight is gathered with a backward that averages the gradient
      over the data-parallel ranks into each rank's shard, as FSDP's own reduce-scatter does (a plain
      ``full_tensor()`` would hand each rank the gradient of its own batch only).
    - FSDP2 with the head in the root unit (tied embeddings): inside the root's forward its parameters are
      unsharded plain tensors already.
    - A DTensor head of another sharding (tensor parallel): passed on; the library gathers it with
      ``full_tensor()`` as TRL does.
    """
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    lm_head, lora = _head_adapter(lm_head)
    weight, bias = lm_head.weight, lm_head.bias
    mesh_dims = _fsdp_data_parallel_dims(lm_head, weight)
    if mesh_dims is not None:
        weight = _replicate_averaging_grads(weight, mesh_dims)
        bias = None if bias is None else _replicate_averaging_grads(bias, mesh_dims)
    # DeepSpeed ZeRO-3: the partitioned head is gathered for the duration of the call, TRL's way (a no-op
    # otherwise), and again in backward while its gradient arrives (_regathered_in_backward).
    params = [t for t in (weight, bias, *(lora[:2] if lora else ())) if t is not None]
    with maybe_gather_lm_head_ctx(*params):
        if hasattr(weight, "ds_id"):
            weight, bias, lora = _regathered_in_backward(weight, bias, lora)
        yield weight, bias, lora


def _regathered_in_backward(weight, bias, lora):
    """ZeRO-3: the head's tensors behind an identity whose backward gathers the partitioned parameters again
    and keeps them gathered until their gradients are accumulated, the state ZeRO-3's own module hooks give a
    parameter in backward (autograd accumulates a [V, H] gradient only into a parameter of that size; ZeRO-3's
    gradient hook then reduces it to the partitions, and the parameters are partitioned again)."""
    params = [t for t in (weight, bias, *(lora[:2] if lora else ())) if t is not None]
    out = list(_ZeroRegather.apply(*params))
    weight = out.pop(0)
    bias = None if bias is None else out.pop(0)
    if lora:
        lora = (out.pop(0), out.pop(0), lora[2])
    return weight, bias, lora


class _ZeroRegather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *params):
        ctx.params = params
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        import deepspeed

        params = [p for p, g in zip(ctx.params, grads) if g is not None and p.requires_grad]
        if params:
            gather = deepspeed.zero.GatheredParameters(params)
            gather.__enter__()
            pending = {id(p) for p in params}

            def accumulated(p):  # registered after ZeRO-3's own hook, so it runs after the reduction
                pending.discard(id(p))
                if not pending:
                    for h in handles:
                        h.remove()
                    gather.__exit__(None, None, None)

            handles = [p.register_post_accumulate_grad_hook(accumulated) for p in params]
        return grads


def _head_adapter(lm_head):
    """(the linear layer under a PEFT LoRA layer on the head, (A, B, scale) of its active adapter), or
    (lm_head, None) for a head without one, or with its adapters disabled (TRL's reference pass) or merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return lm_head, None
    if not isinstance(lm_head, LoraLayer):
        return lm_head, None
    base = lm_head.get_base_layer()
    if lm_head.disable_adapters or lm_head.merged:
        return base, None
    active = [a for a in lm_head.active_adapters if a in lm_head.lora_A]
    if len(active) != 1:
        raise ValueError(f"GRPOKernelsTrainer: a LoRA lm_head needs exactly one active adapter, got {active}")
    (name,) = active
    dropout = lm_head.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity) and dropout.p != 0.0:
        raise ValueError("GRPOKernelsTrainer: lora_dropout on lm_head is not supported (the streamed head applies "
                         "the adapter to the hidden states without dropout); use lora_dropout=0")
    if lm_head.use_dora.get(name, False) or type(lm_head).__name__ != "Linear":
        raise ValueError("GRPOKernelsTrainer: only a plain LoRA (no DoRA) on an nn.Linear lm_head is supported")
    return base, (lm_head.lora_A[name].weight, lm_head.lora_B[name].weight, float(lm_head.scaling[name]))


def _inner_model(model):
    """The model inside an engine wrapper (DeepSpeed's, around TRL's prepared reference model), whose forward the
    engine calls."""
    if "deepspeed" not in sys.modules:  # no engine can exist; importing DeepSpeed costs seconds
        return model
    from deepspeed import DeepSpeedEngine

    return model.module if isinstance(model, DeepSpeedEngine) else model


def _fsdp_data_parallel_dims(module, weight) -> list[bool] | None:
    """For a DTensor parameter of an FSDP2 unit: which dims of its device mesh are FSDP's (data parallel);
    None when ``weight`` is not such a parameter."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor) or not isinstance(module, FSDPModule):
        return None
    mesh = weight.device_mesh
    state = module._get_fsdp_state()
    group = getattr(state, "_fsdp_param_group", None)
    fsdp_mesh = group.mesh_info.mesh if group is not None else mesh
    if fsdp_mesh is mesh or fsdp_mesh == mesh:
        return [True] * mesh.ndim
    names = fsdp_mesh.mesh_dim_names or ()
    if not mesh.mesh_dim_names or not names:
        raise ValueError("GRPOKernelsTrainer: the LM head is an FSDP2 unit on a device mesh other than its "
                         "parameters' and without dim names; cannot tell its data-parallel dims")
    return [n in names for n in mesh.mesh_dim_names]


def _replicate_averaging_grads(t, data_parallel: list[bool]):
    """``t`` (a DTensor) gathered to a full plain tensor; its gradient is averaged over the mesh dims marked
    data parallel (each rank computed it from its own batch) and taken as identical over the others."""
    from torch.distributed.tensor import Partial, Replicate

    full = t.redistribute(placements=[Replicate()] * t.device_mesh.ndim)
    return full.to_local(grad_placements=[Partial("avg") if dp else Replicate() for dp in data_parallel])


def _load_balancing_loss(model, text_config, backbone_out, attention_mask):
    """The MoE load-balancing loss of the router logits, the function and expert counts TRL's head uses."""
    import transformers
    from packaging.version import Version
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if Version(transformers.__version__) < Version("5.0.0"):
        experts, per_token = model.num_experts, model.num_experts_per_tok
    elif text_config.model_type == "gpt_oss" and Version(transformers.__version__) < Version("5.6.0"):
        experts, per_token = model.num_experts, text_config.num_experts_per_tok
    else:
        experts, per_token = text_config.num_experts, text_config.num_experts_per_tok
    return load_balancing_loss_func(backbone_out.router_logits, experts, per_token, attention_mask)
