"""GRPO from scratch in one readable loop, with the loss computed by ``grpo_kernels.grpo_loss``.

The algorithm (GRPO, DeepSeekMath; TRL's GRPOTrainer semantics), one ``for step`` iteration:

1. rollout: take P prompts (this rank's shard), sample G completions per prompt with Hugging Face
   ``model.generate`` (do_sample, temperature, no top-k / top-p), mask each completion after its EOS;
2. reward every completion with the reward function(s) (``--reward module:function``, summed), called as
   TRL calls them: ``fn(prompts=..., completions=..., completion_ids=..., **columns)`` with the data's
   other fields (``answer=``) as keyword lists; a function without ``**kwargs`` is called the older way,
   ``fn(prompts, completions, answers)``;
3. group advantages ``A = (r - mean_group) / (std_group + 1e-4)`` (``grpo_kernels.group_advantages``);
4. ``--mu`` optimisation iterations over the batch, each one AdamW step (gradient clipping, gradient
   accumulation over micro-batches). Iteration 0 is on-policy (ratio 1); the log-probs it returns are
   the "old" log-probs of the sampling policy, so iterations 1.. see ratios != 1 and clipping. The loss
   is ``grpo_kernels.grpo_loss`` on the completion logits (a strided view of the model's output), with
   ``num_items_in_batch`` = the completion tokens of the whole batch over all ranks divided by the number
   of ranks (dapo's global normaliser as TRL passes it: DDP averages the ranks' gradients), and, when ``--beta > 0``, the k3 KL to a frozen reference model (the starting model).

Simplifications: no learning-rate schedule, no vLLM, prompts used as raw text (no chat template), one
sampling temperature for rollout and loss (as TRL).

The embedded default needs nothing prepared and downloads nothing: a tiny randomly initialised
Qwen2ForCausalLM (331k parameters) and a 16-id digit tokenizer built in code (``tasks.py``), learning
to copy 3 digits (``"3 1 4 =" -> "3 1 4" EOS``) with a per-position partial-credit reward. It stops when
the mean reward of the last 10 steps reaches ``--target-reward`` (0.8) or after ``--time-budget`` (300 s).

Launch:

    python python/train_grpo.py                                   # the embedded demo (CPU is fine)
    python python/train_grpo.py --backend torch                   # the eager reference loss instead
    python python/train_grpo.py --task reverse --lr 5e-4          # another digit task
    python python/train_grpo.py --model PATH --prompts data.jsonl --reward my_rewards:score \\
        --max-new-tokens 256 --prompts-per-step 8 --group-size 8 --micro-batch 8 --lr 1e-6
    torchrun --nproc_per_node 2 python/train_grpo.py              # DDP (gloo on CPU, nccl on GPU)
    python python/train_grpo.py --resume runs/grpo/checkpoint-200 # continue a run

Outputs under ``--out`` (default runs/grpo): ``metrics.jsonl`` (one line per step), ``train.png``
(reward, KL, clip ratio, entropy per step), ``checkpoint-STEP/`` (``save_pretrained`` model + tokenizer,
``training_state.pt`` with the optimizer state and the step).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tasks.py next to this file
import tasks  # noqa: E402

import grpo_kernels  # noqa: E402


class UsageError(Exception):
    """A problem with the command line or the user's files/functions; printed without a traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default after its help (unless the help already
    says what the default is)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default is not argparse.SUPPRESS and "(default" not in text and "default:" not in text:
            text += " (default: %(default)s)"
        return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="local Hugging Face causal LM directory with its tokenizer (default: the embedded tiny Qwen2)")
    g.add_argument("--prompts", default=None,
                   help='JSONL file, one {"prompt": str, "answer": str} per line (default: the synthetic --task)')
    g.add_argument("--task", default="copy", choices=tasks.TASKS, help="synthetic digit task (without --prompts)")
    g.add_argument("--digits", type=int, default=3, help="digits per synthetic prompt")
    g.add_argument("--reward", action="append", default=None,
                   help="module:function or file.py:function -> list[float], TRL's signature fn(prompts, "
                   "completions, completion_ids, **columns) (the data's fields, e.g. answer=, as keywords) or "
                   "fn(prompts, completions, answers); repeat to sum several (default: tasks:partial_credit)")
    g = p.add_argument_group("rollout")
    g.add_argument("--prompts-per-step", type=int, default=16, help="P prompts per step over all ranks")
    g.add_argument("--group-size", type=int, default=16, help="G sampled completions per prompt")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: longest answer + 1 with the embedded model, 256 with --model")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, also applied in the loss")
    g = p.add_argument_group("loss and optimisation")
    g.add_argument("--backend", default="auto", choices=grpo_kernels.backends.backend_names(),
                   help="grpo_kernels backend ('torch' = the eager reference)")
    g.add_argument("--loss-type", default="dapo", choices=grpo_kernels.config.LOSS_TYPES,
                   help="how the per-token losses are reduced (TRL's loss_type)")
    g.add_argument("--beta", type=float, default=0.0, help="KL coefficient; > 0 loads a frozen reference model")
    g.add_argument("--epsilon", type=float, default=0.2, help="lower clip offset eps_low")
    g.add_argument("--epsilon-high", type=float, default=None, help="upper clip offset (default: --epsilon)")
    g.add_argument("--mu", type=int, default=2, help="optimisation iterations (optimizer steps) per sampled batch")
    g.add_argument("--micro-batch", type=int, default=256,
                   help="sequences per forward/backward on each rank (gradient accumulation)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping by the global norm")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=2000, help="maximum number of steps")
    g.add_argument("--time-budget", type=float, default=300.0,
                   help="stop after this many seconds of training (0: no limit)")
    g.add_argument("--target-reward", type=float, default=0.8,
                   help="stop when the mean reward of the last 10 steps reaches it (0: never)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model initialisation, the prompts and sampling")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0: 1 for the embedded model (15x faster than several for 331k "
                   "parameters), else torch's default")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--out", default="runs/grpo", help="directory for metrics.jsonl, train.png and checkpoints")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--resume", default=None, help="a checkpoint-STEP directory written by this script")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    args = p.parse_args(argv)
    for name in ("prompts_per_step", "group_size", "mu", "micro_batch", "digits"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group_size < 2:
        p.error("--group-size must be >= 2 (advantages are relative to the group)")
    return args


# --------------------------------------------------------------------------------------------------
# setup helpers: distributed, model, data, rewards
# --------------------------------------------------------------------------------------------------
def init_distributed(device_arg):
    """(rank, world, device). Under torchrun: gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def load_model_and_tokenizer(args, source):
    """The embedded tiny model (source None) or a local Hugging Face directory."""
    if source is None:
        tokenizer = tasks.build_tokenizer()
        return tasks.build_model(tokenizer, seed=args.seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    if not path.is_dir():
        raise UsageError(f"--model/--resume: {source!r} is not a directory (expected a local Hugging Face model "
                         "saved with save_pretrained; nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model/--resume: {source!r} has no config.json; is it a Hugging Face model directory?")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is reported with the path
        raise UsageError(f"--model/--resume: cannot load a tokenizer from {source!r}: {e}") from e
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tokenizer.padding_side = "left"  # generate continues every prompt from the same column
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def read_prompts(path):
    """Rows {"prompt": str, "answer": str} from a JSONL file; errors name the file and line number."""
    if not Path(path).is_file():
        raise UsageError(f"--prompts: no such file {path!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{lineno}: expected a JSON object with fields 'prompt' and 'answer', "
                                 f"got {type(row).__name__}")
            for field in ("prompt", "answer"):
                if not isinstance(row.get(field), str):
                    raise UsageError(f"{path}:{lineno}: field {field!r} must be a string, got {row.get(field)!r}")
            rows.append(row)
    if not rows:
        raise UsageError(f"--prompts: {path!r} has no rows")
    return rows


def load_reward(spec):
    """'module:function' or 'path/to/file.py:function' -> callable."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise UsageError(f"--reward must look like module:function or file.py:function, got {spec!r}")
    try:
        if mod_name.endswith(".py"):
            loader_spec = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            if loader_spec is None or not Path(mod_name).is_file():
                raise FileNotFoundError(mod_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(mod_name)
    except (ImportError, FileNotFoundError) as e:
        raise UsageError(f"--reward {spec!r}: cannot import {mod_name!r} ({e})") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"--reward {spec!r}: {mod_name!r} has no function {fn_name!r}")
    return fn


def takes_trl_keywords(fn) -> bool:
    """True for a TRL-style reward function (one that accepts ``**kwargs``): it is called with keywords."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the positional convention
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def call_reward(fn, prompts, completions, completion_ids, columns):
    """A reward function of either convention: TRL's keywords (``prompts``, ``completions``,
    ``completion_ids`` and each data field as a list, e.g. ``answer``), or ``fn(prompts, completions,
    answers)``."""
    if takes_trl_keywords(fn):
        return fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    return fn(prompts, completions, columns["answer"])


def score(reward_fns, specs, prompts, completions, completion_ids, columns):
    """Sum of the reward functions -> float32 [B]; wrong lengths and NaN/inf are errors naming the function.

    ``columns``: every field of the data rows but "prompt" (e.g. "answer"), one entry per completion."""
    total = torch.zeros(len(completions), dtype=torch.float64)
    for fn, spec in zip(reward_fns, specs, strict=False):
        values = call_reward(fn, prompts, completions, completion_ids, columns)
        try:
            r = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise UsageError(f"reward function {spec!r} must return a list of floats, "
                             f"got {type(values).__name__} ({e})") from None
        if r.numel() != len(completions):
            raise UsageError(f"reward function {spec!r} returned {r.numel()} values for {len(completions)} "
                             "completions (expected one per completion)")
        bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
        if bad:
            raise UsageError(f"reward function {spec!r} returned non-finite values at completions {bad[:8]} "
                             f"(e.g. {r[bad[0]].item()}); rewards must be finite")
        total += r
    return total.float()


def all_reduce(t, op="sum"):
    """In-place sum (or mean) over ranks; a no-op without torch.distributed."""
    if dist.is_initialized():
        dist.all_reduce(t)
        if op == "mean":
            t /= dist.get_world_size()
    return t


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# rollout and the model forward
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(policy, tokenizer, rows, args, gen_config, reward_fns, device):
    """Sample G completions for each row; returns the padded batch, its mask and the rewards.

    prompt_ids [B, Lp] (left-padded), completion_ids [B, T], completion_mask [B, T] (True up to and
    including the first EOS), rewards [B] with B = len(rows) * G, groups contiguous.
    """
    G = args.group_size
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    prompt_ids = enc["input_ids"].to(device).repeat_interleave(G, 0)
    prompt_mask = enc["attention_mask"].to(device).repeat_interleave(G, 0)
    seqs = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config)
    completion_ids = seqs[:, prompt_ids.shape[1]:]
    is_eos = completion_ids == tokenizer.eos_token_id
    completion_mask = (is_eos.cumsum(1) - is_eos.long()) == 0  # no EOS strictly before this position
    shown = completion_ids.masked_fill(~completion_mask, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(shown, skip_special_tokens=True)
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
    ids = [row[keep].tolist() for row, keep in zip(completion_ids.cpu(), completion_mask.cpu(), strict=True)]
    rewards = score(reward_fns, args.reward, prompts, texts, ids, columns).to(device)
    return prompt_ids, prompt_mask, completion_ids, completion_mask, rewards


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Logits [B, T, V] aligned with completion_ids: a view of the model's last T+1 positions."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # as generate numbers left-padded prompts
    T = completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=T + 1)
    logits = out.logits  # [B, T+1, V]
    return logits[:, :-1]  # position t predicts completion token t


# --------------------------------------------------------------------------------------------------
# outputs: checkpoints and the plot
# --------------------------------------------------------------------------------------------------
def save_checkpoint(out_dir, step, policy, tokenizer, optimizer, state):
    path = Path(out_dir) / f"checkpoint-{step}"
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), **state}, path / "training_state.pt")
    return path


def plot_metrics(jsonl_path, png_path, title, target=0.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(jsonl_path, encoding="utf-8") if line.strip()]
    steps = [r["step"] for r in rows]
    panels = [
        ("mean reward", [("reward", "reward")]),
        ("KL", [("kl", "KL to reference (beta > 0)"), ("kl_old", "KL(sampling policy || updated policy)")]),
        ("clip ratio", [("clip_ratio/region_mean", "clipped tokens (last iteration)")]),
        ("entropy", [("entropy", "entropy (nats/token)")]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, (name, series) in zip(axes.flat, panels, strict=False):
        for key, label in series:
            ys = [r.get(key) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(steps, [math.nan if y is None else y for y in ys], label=label, lw=1)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if target > 0:
        axes[0, 0].axhline(target, color="gray", ls="--", lw=1, label=f"target {target}")
        axes[0, 0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    main_rank = rank == 0
    try:  # fail before any work when the asked-for backend cannot run here
        backend_name = grpo_kernels.backends.resolve_backend(args.backend, device)
    except grpo_kernels.BackendUnavailableError as e:
        raise UsageError(f"--backend {args.backend}: {e}") from None
    if args.prompts_per_step % world:
        raise UsageError(f"--prompts-per-step ({args.prompts_per_step}) must be divisible by the number of ranks "
                         f"({world})")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bars between ours
    if args.threads or (args.model is None and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)

    # ---- model, tokenizer, optimizer (and the starting point when resuming)
    state = {}
    if args.resume:
        state_file = Path(args.resume) / "training_state.pt"
        if not state_file.is_file():
            raise UsageError(f"--resume: {args.resume!r} has no training_state.pt (expected a checkpoint-STEP "
                             "directory written by this script)")
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        args.model = args.model or state["args"]["model"]  # the reference model is the run's starting model
    policy, tokenizer = load_model_and_tokenizer(args, args.resume or args.model)
    policy.to(device).train()
    ref_model = None
    if args.beta != 0.0:  # frozen copy of the starting model (not of the resumed checkpoint)
        ref_model, _ = load_model_and_tokenizer(args, args.model)
        ref_model.to(device).eval().requires_grad_(False)
    model = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.99),
                                  weight_decay=args.weight_decay)
    if state:
        optimizer.load_state_dict(state["optimizer"])
    start_step = state.get("step", 0)

    # ---- data: this rank's shard of the prompts, and the reward functions
    if args.prompts:
        rows = read_prompts(args.prompts)
        shard = rows[rank::world]
        if not shard:
            raise UsageError(f"--prompts: {len(rows)} rows are too few for {world} ranks")
        next_rows = lambda rng, k: rng.sample(shard, k) if len(shard) >= k else rng.choices(shard, k=k)
    else:
        next_rows = lambda rng, k: [tasks.make_example(args.task, args.digits, rng) for _ in range(k)]
        rows = next_rows(random.Random(0), 1)  # every synthetic answer has the same length
    # The embedded model answers directly: room for the longest answer + EOS. A real model may reason first.
    answer_len = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows)
    max_new = args.max_new_tokens or (answer_len + 1 if args.model is None else 256)
    args.reward = args.reward or ["tasks:partial_credit"]
    reward_fns = [load_reward(spec) for spec in args.reward]
    from transformers import GenerationConfig

    gen_config = GenerationConfig(
        do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=max_new,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    P_local, G = args.prompts_per_step // world, args.group_size
    micro_batch_weight = grpo_kernels.config.LOSS_TYPE_TABLE[args.loss_type].micro_batch_weight
    loss_opts = dict(
        beta=args.beta, epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, temperature=args.temperature,
        loss_type=args.loss_type, max_completion_length=max_new, backend=args.backend,
    )

    # ---- outputs
    out_dir = Path(args.out)
    jsonl = out_dir / "metrics.jsonl"
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            jsonl.write_text("")
        n_params = sum(p.numel() for p in policy.parameters())
        print(f"model: {'embedded tiny Qwen2' if args.model is None else args.model} ({n_params / 1e3:.0f}k "
              f"parameters), task: {args.prompts or args.task}, "
              f"loss backend: {args.backend} -> {backend_name}, ranks: {world} ({device.type}), "
              f"batch: {args.prompts_per_step} prompts x {G} completions, max_new_tokens {max_new}", flush=True)
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=start_step, disable=not main_rank or args.no_progress, dynamic_ncols=True)
    recent = list(state.get("recent_rewards", []))  # rewards of the last 10 steps (the stop criterion)
    totals = dict(state.get("totals", {"time": 0.0, "gen": 0.0, "loss": 0.0, "tokens": 0, "steps": 0}))
    first_reward = state.get("first_reward")
    step = start_step

    for step in range(start_step + 1, args.steps + 1):
        t_step = time.perf_counter()
        # Per-step seeds: a resumed run samples exactly what the uninterrupted run would have sampled.
        rng = random.Random(f"{args.seed}-{rank}-{step}")
        torch.manual_seed(hash((args.seed, rank, step)) % 2**62)

        # ---- 1-2. rollout and rewards
        model.eval()
        batch = rollout(policy, tokenizer, next_rows(rng, P_local), args, gen_config, reward_fns, device)
        model.train()
        prompt_ids, prompt_mask, completion_ids, completion_mask, rewards = batch
        sync(device)
        t_gen = time.perf_counter() - t_step

        # ---- 3. group advantages; global token count (all micro-batches, all ranks)
        advantages = grpo_kernels.group_advantages(rewards, G)
        local_tokens = completion_mask.sum().float()
        num_items = all_reduce(local_tokens.clone())
        tokens_per_rank = [local_tokens.clone() for _ in range(world)]
        if world > 1:
            dist.all_gather(tokens_per_rank, local_tokens)
        ref_logps = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logits = completion_logits(ref_model, *batch[:4])
                ref_logps = grpo_kernels.token_logprobs(ref_logits, completion_ids, temperature=args.temperature,
                                                        backend=args.backend)

        # ---- 4. mu optimisation iterations over the batch
        B = completion_ids.shape[0]
        micro = [slice(i, min(i + args.micro_batch, B)) for i in range(0, B, args.micro_batch)]
        tokens = [completion_mask[sl].sum().item() for sl in micro]
        # the factor of each micro-batch's loss that makes their gradients sum to the whole batch's: 1 for the
        # loss types normalised by num_items_in_batch (global already), else its share of the batch's sequences
        # or kept tokens (grpo_kernels.config.LossType.micro_batch_weight)
        share = {"one": [1.0] * len(micro), "sequences": [(sl.stop - sl.start) / B for sl in micro],
                 "tokens": [t / max(sum(tokens), 1) for t in tokens]}[micro_batch_weight]
        old_logps, t_loss, metrics = None, 0.0, {}
        for it in range(args.mu):
            new_logps, sums = [], {}
            for j, sl in enumerate(micro):
                # DDP averages gradients over ranks; the num_items_in_batch normaliser is divided by the world
                # size so that the sum over ranks and micro-batches is exactly sum(loss_tok) / num_items (as TRL).
                ctx = model.no_sync() if world > 1 and j < len(micro) - 1 else nullcontext()
                with ctx:
                    logits = completion_logits(model, *(t[sl] for t in batch[:4]))
                    # The loss runs on a detached leaf so that its time (forward + backward) is measured
                    # on its own; its gradient is then pushed through the model.
                    leaf = logits.detach().requires_grad_(True)
                    sync(device)
                    t0 = time.perf_counter()
                    out = grpo_kernels.grpo_loss(
                        leaf, completion_ids[sl], completion_mask=completion_mask[sl], advantages=advantages[sl],
                        old_logps=None if old_logps is None else old_logps[sl],
                        ref_logps=None if ref_logps is None else ref_logps[sl],
                        num_items_in_batch=num_items / world, **loss_opts,
                    )
                    loss = out.loss * share[j]
                    loss.backward()
                    sync(device)
                    t_loss += time.perf_counter() - t0
                    logits.backward(leaf.grad)
                new_logps.append(out.logps)
                w = tokens[j] / max(sum(tokens), 1)  # token share of the micro-batch (metric weights)
                sums["loss"] = sums.get("loss", 0.0) + loss.detach()  # summed: the batch loss (mean over ranks)
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + w * v
                if old_logps is not None:  # k3 estimate of KL(sampling policy || current policy)
                    d = (new_logps[-1] - old_logps[sl])[completion_mask[sl]]
                    sums["kl_old"] = sums.get("kl_old", 0.0) + w * (torch.exp(d) - d - 1).mean()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if it == 0:
                old_logps = torch.cat(new_logps)  # the sampling policy's log-probs (before any update)
                metrics.update({k: sums[k] for k in ("loss", "entropy", "kl") if k in sums})
            if it == args.mu - 1:
                metrics.update({k: v for k, v in sums.items() if k.startswith(("clip_ratio", "cispo", "kl_old"))})
                metrics["grad_norm"] = grad_norm.detach()
        step_time = time.perf_counter() - t_step

        # ---- logging (global means over ranks), stop criteria, checkpoints
        metrics.update(reward=rewards.mean(), reward_std=rewards.std())
        names = sorted(metrics)
        values = all_reduce(torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=device)
                                         for k in names]), "mean")
        row = {"step": step, **{k: round(v, 6) for k, v in zip(names, values.tolist(), strict=True)}}
        row.update(num_items_in_batch=int(num_items.item()), tokens_per_rank=[int(t.item()) for t in tokens_per_rank],
                   completion_len=round(num_items.item() / (B * world), 3), step_time=round(step_time, 4),
                   gen_time=round(t_gen, 4), loss_time=round(t_loss, 4))
        totals = {"time": totals["time"] + step_time, "gen": totals["gen"] + t_gen, "loss": totals["loss"] + t_loss,
                  "tokens": totals["tokens"] + int(num_items.item()), "steps": totals["steps"] + 1}
        first_reward = row["reward"] if first_reward is None else first_reward
        recent = (recent + [row["reward"]])[-10:]
        if main_rank:
            with open(jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            kl_name = "kl" if "kl" in row else "kl_old"
            shown = {"reward": f"{row['reward']:.3f}", kl_name: f"{row.get(kl_name, 0.0):.4f}",
                     "H": f"{row['entropy']:.3f}"}
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if args.no_progress and (step % 10 == 0 or step == 1):
                print(f"step {step}: " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        reached = args.target_reward > 0 and len(recent) == 10 and sum(recent) / 10 >= args.target_reward
        out_of_time = args.time_budget > 0 and totals["time"] >= args.time_budget
        done = reached or out_of_time or step == args.steps
        if main_rank and (done or (args.save_every and step % args.save_every == 0)):
            save_checkpoint(out_dir, step, policy, tokenizer, optimizer, {
                "recent_rewards": recent, "totals": totals, "first_reward": first_reward, "args": vars(args)})
        if done:
            break
    bar.close()

    # ---- summary
    if main_rank and totals["steps"]:
        png = out_dir / "train.png"
        title = (f"GRPO on {args.prompts or args.task} (loss backend {args.backend} -> {backend_name}, "
                 f"seed {args.seed}, {world} rank(s))")
        plot_metrics(jsonl, png, title, args.target_reward)
        final = sum(recent) / len(recent)
        why = "target reached" if reached else ("time budget spent" if out_of_time else "last step")
        T = totals["time"]
        print(f"start reward {first_reward:.3f} -> final reward {final:.3f} (mean of the last {len(recent)} steps) "
              f"at step {step} after {T:.1f} s of training ({why})")
        rest = T - totals["gen"] - totals["loss"]
        print(f"{totals['steps'] / T:.2f} steps/s, {totals['tokens'] / T:.0f} completion tokens/s (all ranks); "
              f"step time: {100 * totals['gen'] / T:.0f}% generate, {100 * totals['loss'] / T:.0f}% in "
              f"grpo_kernels.grpo_loss (forward + backward), {100 * rest / T:.0f}% model forward/backward + optimizer")
        print(f"wrote {jsonl}, {png}, {out_dir / f'checkpoint-{step}'}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"train_grpo.py: error: {e}", file=sys.stderr)
        sys.exit(2)
