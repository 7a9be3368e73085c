"""Stock TRL 1.16 ``GRPOTrainer`` against ``GRPOKernelsTrainer`` on one micro-batch, in one process each.

    python -m bench.trl_step                                   # N = 4,096, H = 256, V = 32,000 and 64,000
    python -m bench.trl_step --n 256 --vocab 512 --repeats 1 --out /tmp/smoke

Both trainers get the same model (a randomly initialised 2-layer ``Qwen2ForCausalLM`` of hidden size ``--hidden``
and vocabulary V, fp32, built in code: nothing is downloaded) and the same inputs: B = N / T sequences of
``--prompt`` prompt tokens and T = ``--completion`` completion tokens, old and reference log-probs (beta 0.04,
dapo, TRL's defaults otherwise). Two phases are measured per implementation:

- ``loss_bwd``: ``trainer._compute_loss(model, inputs)`` and ``loss.backward()``, the work of one micro-batch
  (the model's forward and backward included: they are the same in both rows);
- ``logps``: ``trainer._get_per_token_logps_and_entropies(...)`` under ``torch.no_grad()``, an old-policy or
  reference pass as TRL runs it during generation.

Time: one warm-up, then ``--repeats`` runs; median and worst. Memory: after the timed runs the process's peak
RSS counter (VmHWM) is reset through ``/proc/self/clear_refs`` and one more run is made; the figure is
peak RSS minus the RSS just before it, so it counts every allocator (torch's CPU allocator has no peak counter
of its own; tracemalloc sees no torch memory). Each (implementation, V) runs in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed buffers return to the system instead of hiding later peaks in
glibc's heap. Results: ``bench/results/cpu-trl_step-n{N}-h{H}.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import harness

ROOT = harness.ROOT
IMPLS = ("trl", "grpo_kernels")


def _build(impl: str, cfg: dict):
    import datasets
    import trl
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT / "python"))
    import tasks

    torch.manual_seed(0)
    V, H = cfg["vocab"], cfg["hidden"]
    config = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         max_position_embeddings=cfg["prompt"] + cfg["completion"] + 8, attn_implementation="sdpa",
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = Path(cfg["out_dir"]) / f"model-v{V}-h{H}"
    Qwen2ForCausalLM(config).save_pretrained(path)  # by path: TRL loads the reference model (beta != 0) from it
    tok = tasks.build_tokenizer()
    tok.save_pretrained(path)
    args = trl.GRPOConfig(output_dir=cfg["out_dir"], use_cpu=True, report_to="none", bf16=False, beta=0.04,
                          per_device_train_batch_size=cfg["batch"], num_generations=cfg["batch"],
                          max_completion_length=cfg["completion"], gradient_accumulation_steps=1,
                          save_strategy="no", logging_steps=1)
    dataset = datasets.Dataset.from_list([{"prompt": "1 2 ="}] * cfg["batch"])
    kwargs = dict(model=str(path), reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                  train_dataset=dataset, processing_class=tok)
    if impl == "trl":
        return trl.GRPOTrainer(**kwargs)
    from grpo_kernels.integrations.trl import GRPOKernelsTrainer

    return GRPOKernelsTrainer(backend=cfg["backend"], **kwargs)


def _inputs(cfg: dict) -> dict:
    g = torch.Generator().manual_seed(1)
    B, P, T, V = cfg["batch"], cfg["prompt"], cfg["completion"], cfg["vocab"]
    completion_mask = (torch.arange(T)[None] < torch.randint(T // 2, T + 1, (B, 1), generator=g)).long()
    completion_mask[0] = 1
    return dict(prompt_ids=torch.randint(3, V, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.long),
                completion_ids=torch.randint(3, V, (B, T), generator=g), completion_mask=completion_mask,
                advantages=torch.randn(B, generator=g), num_items_in_batch=completion_mask.sum(),
                old_per_token_logps=-torch.rand(B, T, generator=g) * 8 - 8,
                ref_per_token_logps=-torch.rand(B, T, generator=g) * 8 - 8)


def worker(cfg: dict) -> dict:
    trainer = _build(cfg["impl"], cfg)
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    x = _inputs(cfg)

    values = {}

    def loss_bwd():
        model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(model, x)
        loss.backward()
        values["loss"] = loss.item()
        model.zero_grad(set_to_none=True)  # the parameter gradients are the model's, not the loss's memory

    ids = torch.cat([x["prompt_ids"], x["completion_ids"]], 1)
    attn = torch.cat([x["prompt_mask"], x["completion_mask"]], 1)

    def logps():
        with torch.no_grad():
            lp, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, cfg["completion"],
                                                                  batch_size=cfg["batch"])
        values["logps_sum"] = (lp * x["completion_mask"]).sum().item()

    out = {"impl": cfg["impl"], "vocab": cfg["vocab"]}
    for name, fn in (("loss_bwd", loss_bwd), ("logps", logps)):
        fn()  # warm-up
        ms = []
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
        out[name] = {"median_ms": statistics.median(ms), "worst_ms": max(ms), "runs_ms": ms,
                     "peak_extra_mib": harness.peak_rss_extra(fn)["peak_extra_mib"]}
    out.update(values)  # the two implementations must compute the same numbers
    return out


def _run_one(cfg: dict) -> dict:
    try:
        return harness.run_fresh("bench.trl_step", ["--worker", json.dumps(cfg)],
                                 env={"MALLOC_MMAP_THRESHOLD_": "65536"}, tail_lines=40)
    except harness.WorkerFailed as e:
        raise RuntimeError(f"worker {cfg['impl']} V={cfg['vocab']} failed:\n{e}") from None


def _targets(rows: dict, vocabs: list[int]) -> list[dict]:
    t = []
    for V in vocabs:
        trl_r, gk_r = rows[("trl", V)], rows[("grpo_kernels", V)]
        mem = gk_r["loss_bwd"]["peak_extra_mib"] / trl_r["loss_bwd"]["peak_extra_mib"]
        tim = gk_r["loss_bwd"]["median_ms"] / trl_r["loss_bwd"]["median_ms"]
        lpt = gk_r["logps"]["median_ms"] / trl_r["logps"]["median_ms"]
        lpm = gk_r["logps"]["peak_extra_mib"] <= trl_r["logps"]["peak_extra_mib"]
        t += [dict(what=f"V={V}: loss+backward peak memory vs TRL", value=mem, goal="<= 0.10", met=mem <= 0.10),
              dict(what=f"V={V}: loss+backward time vs TRL", value=tim, goal="<= 0.5", met=tim <= 0.5),
              dict(what=f"V={V}: log-prob pass time vs TRL", value=lpt, goal="<= 0.5", met=lpt <= 0.5),
              dict(what=f"V={V}: log-prob pass memory <= TRL's", value=gk_r["logps"]["peak_extra_mib"]
                   / trl_r["logps"]["peak_extra_mib"], goal="<= 1.0", met=lpm)]
    if len(vocabs) == 2:
        a, b = (rows[("grpo_kernels", V)]["loss_bwd"]["peak_extra_mib"] for V in vocabs)
        r = max(a, b) / min(a, b)
        t.append(dict(what=f"adapter loss+backward memory V={vocabs[1]} vs V={vocabs[0]}", value=r, goal="<= 1.25",
                      met=r <= 1.25))
    return t


def _markdown(res: dict) -> str:
    e, c = res["environment"], res["config"]
    lines = [f"# TRL 1.16 GRPOTrainer vs GRPOKernelsTrainer, one micro-batch (N = {c['n']}, H = {c['hidden']})", "",
             f"{e['device']}, {e['cpu_count']} CPUs, torch {e['torch']}, trl {e['trl']}, transformers "
             f"{e['transformers']}, commit {e['git_commit']}, {e['date_utc']}; load average at start "
             f"{e.get('load_avg_start')}. Command: `{res['command']}`", "",
             "| V | phase | implementation | median ms | worst ms | peak extra MiB |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for ph in ("loss_bwd", "logps"):
            s = r[ph]
            lines.append(f"| {r['vocab']:,} | {ph} | {r['impl']} | {s['median_ms']:.0f} | {s['worst_ms']:.0f} | "
                         f"{s['peak_extra_mib']:.0f} |")
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['what']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
              for t in res["targets"]]
    lines += ["", res["note"], ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096, help="completion tokens per micro-batch (default 4096)")
    p.add_argument("--hidden", type=int, default=256, help="model hidden size H (default 256)")
    p.add_argument("--vocab", default="32000,64000", help="comma-separated vocabulary sizes (default 32000,64000)")
    p.add_argument("--completion", type=int, default=512, help="completion length T; B = N / T (default 512)")
    p.add_argument("--prompt", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    p.add_argument("--backend", default="auto", help="grpo_kernels backend (default auto)")
    p.add_argument("--out", default=str(harness.RESULTS_DIR), help="results directory")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return {}
    T = min(a.completion, a.n)
    if a.n % T:
        p.error(f"--n ({a.n}) must be a multiple of --completion ({T})")
    vocabs = [int(v) for v in a.vocab.split(",")]
    base = dict(batch=a.n // T, completion=T, prompt=a.prompt, hidden=a.hidden, repeats=a.repeats,
                backend=a.backend, out_dir=tempfile.mkdtemp(prefix="trl_step_"))  # models and trainer output
    env = harness.environment(torch.device("cpu"), "trl", "transformers")
    load = harness.LoadMeter()
    rows = {}
    for V in vocabs:  # side by side: the two implementations alternate within one run
        for impl in IMPLS:
            rows[(impl, V)] = _run_one(dict(base, impl=impl, vocab=V))
            print(f"V={V} {impl}: " + ", ".join(f"{ph} {rows[(impl, V)][ph]['median_ms']:.0f} ms "
                                                 f"+{rows[(impl, V)][ph]['peak_extra_mib']:.0f} MiB"
                                                 for ph in ("loss_bwd", "logps")), flush=True)
    others = load.others_cpus()
    res = dict(op="trl_step", config=dict(n=a.n, hidden=a.hidden, vocab=vocabs, batch=base["batch"], completion=T,
                                          prompt=a.prompt, repeats=a.repeats, backend=a.backend, dtype="fp32",
                                          model="Qwen2ForCausalLM, 2 layers, untied head, sdpa"),
               environment=env, rows=list(rows.values()), targets=_targets(rows, vocabs),
               command="python -m bench.trl_step " + " ".join(argv if argv is not None else sys.argv[1:]),
               note=(f"Other processes used {others:.2f} CPUs on average during the run (shared machine: times "
                     "are noisy; the two implementations alternate per V so they see similar load). Memory: peak "
                     "RSS minus RSS before the measured run, fresh process per row, MALLOC_MMAP_THRESHOLD_=65536.")
               if others is not None else "")
    harness.write_results(a.out, f"cpu-trl_step-n{a.n}-h{a.hidden}", res, _markdown(res))
    return res


if __name__ == "__main__":
    main()
