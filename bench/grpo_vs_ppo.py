"""One optimizer step of GRPO against one of PPO: time, peak memory, and model-state bytes, per model size.

    python -m bench.grpo_vs_ppo                       # sizes small, medium, large on the CPU (a few minutes)
    python -m bench.grpo_vs_ppo --sizes small --steps 2
    python -m bench.grpo_vs_ppo --device cuda --dtype bf16

What is compared: the argument for GRPO is that it needs no critic (value model), so a step costs less time
and memory than PPO's at the same policy size. Both algorithms here train the same policy, a Qwen2 causal LM
built in code from a ``transformers.Qwen2Config`` (random weights, nothing downloaded), on the same batch:
``--prompts`` prompts x ``--group`` completions of ``--completion`` tokens after ``--prompt`` prompt tokens
(the same trained tokens for both). Generation is excluded from both (the completions are random token ids,
the rewards random numbers): it costs the same for both algorithms and would dominate the step.

One step, timed from the batch to the end of ``optimizer.step()``:

- both: the frozen reference model's forward (no gradient) when ``--beta`` > 0, for the KL term;
- GRPO: group-relative advantages from the rewards (``grpo_kernels.group_advantages``), then the policy's
  forward, ``grpo_kernels.grpo_loss`` (the fused loss), backward, AdamW step over the policy;
- PPO: the critic's forward without gradient for the rollout values, GAE (gamma = 1, lambda = 0.95) over
  the per-token rewards (the sequence reward on its last token), whitened advantages; then the policy's
  forward and the same fused loss with those per-token advantages, the critic's forward and its clipped value
  loss (clip 0.2, coefficient 0.1), one backward through both, AdamW step over policy and critic. The critic
  has the policy's architecture (its own Qwen2 backbone, the same config) with a scalar value head instead of
  the LM head, as in TRL's PPO.

Both use the on-policy form (one step per batch: the old log-probs are the current ones, detached) and the
same loss options. Per size and algorithm, in a fresh process each: the median step time over ``--steps``
steps after one warm-up step; the peak memory of the process during those steps (CPU: peak RSS minus the
RSS before any model was built; CUDA: ``max_memory_allocated``); and the bytes of parameters, gradients and
AdamW state (exp_avg, exp_avg_sq) counted from the tensors, the reference model's parameters included.
Results: ``bench/results/<device>-grpo_vs_ppo.json`` / ``.md`` and ``grpo_vs_ppo.png``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from . import harness

NAME = "grpo_vs_ppo"
# hidden, layers, attention heads, key-value heads, MLP width; the vocabulary is --vocab for every size
SIZES = {
    "tiny": (32, 1, 2, 1, 64),  # the smoke test's
    "small": (256, 2, 4, 2, 704),
    "medium": (384, 4, 6, 2, 1024),
    "large": (512, 6, 8, 2, 1408),
}
GAMMA, LAM, VALUE_CLIP, VF_COEF = 1.0, 0.95, 0.2, 0.1


def qwen2_config(size: str, vocab: int, max_len: int):
    import transformers

    h, layers, heads, kv, inter = SIZES[size]
    return transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=max_len, tie_word_embeddings=False,
        use_cache=False)


class Critic(nn.Module):
    """The policy's architecture with a scalar value head: a Qwen2 backbone and Linear(hidden, 1)."""

    def __init__(self, config):
        super().__init__()
        import transformers

        self.backbone = transformers.Qwen2Model(config)
        self.value_head = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, input_ids, attention_mask):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.value_head(h).squeeze(-1)  # [B, S]


def gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """Generalised advantage estimation over [B, T] per-token rewards and values; masked positions are
    past the end of the completion (value 0, no reward). -> (advantages, returns)."""
    B, T = rewards.shape
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        nxt = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def whiten(x, mask):
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def make_batch(args, device):
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    B, P, T = args.prompts * args.group, args.prompt, args.completion
    prompt = torch.randint(0, args.vocab, (args.prompts, P), generator=g).repeat_interleave(args.group, 0)
    completion = torch.randint(0, args.vocab, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.rand(B, generator=g)
    ids = torch.cat([prompt, completion], 1)
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1)
    return {k: v.to(device) for k, v in dict(ids=ids, attn=attn, completion=completion, mask=mask,
                                                rewards=rewards, lengths=lengths).items()}


def state_bytes(trained: list[nn.Module], frozen: list[nn.Module], opt: torch.optim.Optimizer) -> dict:
    """Bytes of the trained parameters, their gradients (one per trained parameter, as after backward), the
    AdamW state, and the frozen reference model's parameters."""
    params = sum(p.numel() * p.element_size() for m in trained for p in m.parameters())
    frozen_b = sum(p.numel() * p.element_size() for m in frozen for p in m.parameters())
    grads = sum(p.numel() * p.element_size() for m in trained for p in m.parameters() if p.requires_grad)
    optim = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    n_params = sum(p.numel() for m in trained for p in m.parameters())
    return {"trained_params": n_params, "param_bytes": params, "grad_bytes": grads, "optimizer_bytes": optim,
            "frozen_ref_bytes": frozen_b, "state_bytes": params + grads + optim + frozen_b}


def build(algo: str, args, device):
    from transformers import Qwen2ForCausalLM

    dtype = harness.DTYPES[args.dtype]
    cfg = qwen2_config(args.size, args.vocab, args.prompt + args.completion)
    torch.manual_seed(args.seed)
    policy = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)
    ref = None
    if args.beta:
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = Critic(cfg).to(device=device, dtype=dtype) if algo == "ppo" else None
    trained = [policy] + ([critic] if critic is not None else [])
    opt = torch.optim.AdamW([p for m in trained for p in m.parameters()], lr=1e-6)
    return policy, ref, critic, trained, opt


def step(algo: str, args, batch, policy, ref, critic, opt, backend: str) -> torch.Tensor:
    import grpo_kernels

    P, T, G = args.prompt, args.completion, args.group
    ids, attn, comp, mask = batch["ids"], batch["attn"], batch["completion"], batch["mask"]
    keep = T + 1  # the logits of the last T+1 positions: the ones that predict the completion (and one spare)
    with torch.no_grad():
        ref_logps = None
        if ref is not None:
            ref_logits = ref(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits[:, :-1]
            ref_logps = grpo_kernels.token_logprobs(ref_logits, comp, backend=backend)
            del ref_logits
        if algo == "grpo":
            adv = grpo_kernels.group_advantages(batch["rewards"], G)
        else:
            old_values = critic(ids, attn)[:, P - 1 : -1].float()
            tok_rewards = torch.zeros(mask.shape, device=mask.device)
            tok_rewards[torch.arange(mask.shape[0]), batch["lengths"] - 1] = batch["rewards"]
            adv, returns = gae(tok_rewards, old_values, mask.float())
            adv = whiten(adv, mask.float())
    logits = policy(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits[:, :-1]
    loss = grpo_kernels.grpo_loss(logits, comp, completion_mask=mask, advantages=adv, ref_logps=ref_logps,
                                  beta=args.beta, loss_type=args.loss_type, backend=backend).loss
    if algo == "ppo":
        v = critic(ids, attn)[:, P - 1 : -1].float()
        v_clip = old_values + (v - old_values).clamp(-VALUE_CLIP, VALUE_CLIP)
        vf = torch.maximum((v - returns) ** 2, (v_clip - returns) ** 2)
        loss = loss + VF_COEF * 0.5 * (vf * mask).sum() / mask.sum().clamp(min=1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def run_one(algo: str, args) -> dict:
    """Build, warm up, time: in this process (call it in a fresh one for the memory numbers)."""
    import grpo_kernels

    device = torch.device(args.device)
    backend = "cpu" if device.type == "cpu" else "auto"
    if device.type == "cpu" and "cpu" not in grpo_kernels.available_backends("cpu"):
        raise RuntimeError("the C++ CPU module of grpo_kernels is not built: the fused loss cannot run on the CPU")
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (its import is not the step's memory)

    gc.collect()
    base_rss = harness.proc_status_kib("VmRSS") * 1024 if device.type == "cpu" else None
    policy, ref, critic, trained, opt = build(algo, args, device)
    batch = make_batch(args, device)
    step(algo, args, batch, policy, ref, critic, opt, backend)  # warm-up: optimizer state, thread pools
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    reset = device.type == "cpu" and harness.reset_peak_rss()
    times, losses = [], []
    for _ in range(args.steps):
        harness.synchronize(device)
        t0 = time.perf_counter()
        losses.append(float(step(algo, args, batch, policy, ref, critic, opt, backend)))
        harness.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"algo": algo, "size": args.size, "step_ms": statistics.median(times), "times_ms": times,
           "loss": losses[-1]}
    if device.type == "cpu":
        peak = harness.proc_status_kib("VmHWM") * 1024 if reset else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_bytes"] = peak - base_rss
        out["peak_method"] = ("peak RSS (VmHWM, reset after the warm-up step) during the timed steps minus the RSS "
                              "before any model was built" if reset else
                              "ru_maxrss (warm-up included) minus the RSS before any model was built")
    else:
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_method"] = "torch.cuda.max_memory_allocated during the timed steps (models and state included)"
        out["state_allocated_before_bytes"] = base_cuda
    out.update(state_bytes(trained, [ref] if ref is not None else [], opt))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="small,medium,large", help=f"comma list of {list(SIZES)}")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompts", type=int, default=2, help="prompts per batch")
    p.add_argument("--group", type=int, default=4, help="G completions per prompt")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--completion", type=int, default=64, help="completion tokens")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: the reference model runs)")
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--dtype", choices=harness.DTYPES, default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median) after one warm-up step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(harness.RESULTS_DIR))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one (algo, size) and print its JSON


def _child(algo: str, size: str, args) -> dict:
    spec = dict(vars(args), size=size, algo=algo)
    spec.pop("one", None)
    try:
        return harness.run_fresh("bench.grpo_vs_ppo", ["--one", json.dumps(spec)])
    except harness.WorkerFailed as e:
        raise RuntimeError(f"{algo} {size} failed: {e}") from None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.grpo_vs_ppo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.one:
        spec = argparse.Namespace(**json.loads(args.one))
        print(json.dumps(run_one(spec.algo, spec)))
        return {}
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        p.error(f"--sizes must be a comma list of {list(SIZES)}, got {args.sizes!r}")
    if args.prompts < 1 or args.group < 2 or args.completion < 2 or args.prompt < 1 or args.steps < 1:
        p.error("--prompts >= 1, --group >= 2, --prompt >= 1, --completion >= 2 and --steps >= 1 are needed")
    meter = harness.LoadMeter()
    device = torch.device(args.device)
    env = harness.environment(device, "transformers")
    rows = []
    for size in sizes:
        pair = {}
        for algo in ("grpo", "ppo"):
            r = _child(algo, size, args)
            pair[algo] = r
            rows.append(r)
            print(f"  {size:<7} {algo:<5} step {r['step_ms']:9.1f} ms  peak {r['peak_bytes'] / 2**20:8.1f} MiB  "
                  f"params+grads+AdamW(+ref) {r['state_bytes'] / 2**20:8.1f} MiB  ({r['trained_params'] / 1e6:.1f} M "
                  f"trained parameters)", flush=True)
        for key in ("step_ms", "peak_bytes", "state_bytes"):
            pair["ppo"][f"{key}_vs_grpo"] = pair["ppo"][key] / pair["grpo"][key]
    others = meter.others_cpus()
    env["other_processes_cpus"] = None if others is None else round(others, 3)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "one", "no_plot")}
    config["model"] = {s: dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate"), SIZES[s], strict=True))
                       for s in sizes}
    result = {"kind": NAME, "config": config, "env": env, "rows": rows}
    out = Path(args.out)
    stem = f"{device.type}-{NAME}"
    harness.write_results(out, stem, result, markdown(result, stem))
    if not args.no_plot:
        plot(result, out / f"{NAME}.png")
    print(f"  wrote {out / stem}.json, .md" + ("" if args.no_plot else f", {out / NAME}.png"))
    return result


def markdown(result: dict, stem: str) -> str:
    c, e = result["config"], result["env"]
    lines = [
        f"# GRPO against PPO: one optimizer step, {c['device']}, {c['dtype']}", "",
        f"Generated by `python -m bench.grpo_vs_ppo` into `{stem}.json`; reproduce with `python -m bench.grpo_vs_ppo "
        f"--sizes {c['sizes']} --device {c['device']} --dtype {c['dtype']} --steps {c['steps']}`.", "",
        f"- device: {e['device']} ({e['cpu_count']} logical CPUs, torch threads {e['torch_threads']})",
        f"- versions: python {e['python']}, torch {e['torch']}, transformers {e.get('transformers')}, grpo_kernels "
        f"{e['grpo_kernels']}",
        f"- commit {e['git_commit']}{' (uncommitted changes present)' if e.get('git_dirty') else ''}, {e['date_utc']}",
        f"- load: other processes used {harness.fmt(e.get('other_processes_cpus'), '.2f')} CPUs on average during "
        "the run",
        f"- batch: {c['prompts']} prompts x G={c['group']} completions, {c['prompt']} prompt + {c['completion']} "
        f"completion tokens, vocabulary {c['vocab']}; beta {c['beta']} (the reference model's forward is in both "
        f"steps), loss_type {c['loss_type']}; AdamW; median of {c['steps']} steps after one warm-up step, each "
        "(algorithm, size) in a fresh process",
        "- generation is excluded from both (random completions and rewards); PPO's step includes the critic's "
        "rollout values, GAE (gamma 1, lambda 0.95), the critic's forward+backward with the clipped value loss and "
        "its AdamW update",
        "- models (Qwen2, built from a config): " + "; ".join(
            f"{s}: hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads ({m['kv_heads']} KV), MLP "
            f"{m['intermediate']}" for s, m in c["model"].items()),
        "",
    ]
    if c["device"] == "cpu" and (e.get("other_processes_cpus") or 0) > harness.BUSY_CPUS:
        lines += [f"**Warning: other processes used {e['other_processes_cpus']:.2f} CPUs on average during this run: "
                  "the times are not representative (the memory numbers are).**", ""]
    lines += ["| size | algorithm | trained params | step ms (median) | PPO / GRPO time | peak memory MiB | "
              "PPO / GRPO peak | params + grads + AdamW + ref MiB | PPO / GRPO state |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['size']} | {r['algo'].upper()} | {r['trained_params'] / 1e6:.1f} M | {r['step_ms']:.1f} | "
            f"{harness.fmt(r.get('step_ms_vs_grpo'), '.2f', '')} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{harness.fmt(r.get('peak_bytes_vs_grpo'), '.2f', '')} | {r['state_bytes'] / 2**20:.1f} | "
            f"{harness.fmt(r.get('state_bytes_vs_grpo'), '.2f', '')} |")
    lines += ["", f"Peak memory: {result['rows'][0].get('peak_method')}.", ""]
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in result["rows"]))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, label, scale in ((axes[0], "step_ms", "step time, ms", 1.0),
                                  (axes[1], "peak_bytes", "peak memory, MiB", 2**20),
                                  (axes[2], "state_bytes", "params + grads + AdamW + ref, MiB", 2**20)):
        for k, algo in enumerate(("grpo", "ppo")):
            ys = [next(r[key] for r in result["rows"] if r["size"] == s and r["algo"] == algo) / scale for s in sizes]
            ax.bar([i - 0.2 + 0.4 * k for i in range(len(sizes))], ys, 0.4, label=algo.upper())
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    c = result["config"]
    fig.suptitle(f"one optimizer step, GRPO vs PPO ({result['env']['device']}, {c['dtype']}; generation excluded)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
