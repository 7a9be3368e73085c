"""Long completions: stock TRL 1.16 ``GRPOTrainer`` against ``GRPOKernelsTrainer`` as the completion grows.

    python -m bench.long_context                                # N = 1K .. 32K, V = 151,936, H = 256
    python -m bench.long_context --n 256,512 --vocab 4000 --out /tmp/smoke

One point = one completion of N tokens (B = 1, T = N, fully unmasked; ``--completion T`` splits N into
B = N / T sequences instead) after a ``--prompt``-token prompt, scored by the model of ``bench.trl_step`` (a
randomly initialised 2-layer ``Qwen2ForCausalLM``, hidden size ``--hidden``, untied head of V rows, fp32, built in
code) with both trainers built as there (beta 0.04, dapo). Every (implementation, N) runs in a fresh process
and measures, in this order:

- ``loss_bwd``: ``trainer._compute_loss(model, inputs)`` and ``loss.backward()`` (the model's forward and
  backward included);
- ``logps``: one old-policy / reference pass, ``trainer._get_per_token_logps_and_entropies`` under
  ``torch.no_grad()``;
- ``model_bwd`` (the ``grpo_kernels`` process only): the model's backbone forward and backward without any
  LM head (the completion positions' last hidden states times a fixed random tensor, summed), i.e. the
  memory and time that are the model's own and not the loss head's.

Each phase runs once on a 64-token slice of the completion (warm-up: thread pools, lazy imports), then once
at full size: its wall time, and its peak RSS (VmHWM, reset through ``/proc/self/clear_refs`` just before) minus
the RSS just before it, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed buffers go back to the system
(the measurement of ``bench.trl_step``; tracemalloc does not see torch's allocations). One measured run per
phase: at 32K tokens a TRL step takes minutes on two cores.

Memory guard (a shared machine): before a point, the peak RSS of each implementation is extrapolated linearly
from its two previous points; a point whose extrapolation exceeds ``--budget-gib`` (or what the machine has
available) is not run and is reported with that extrapolation. A running point whose RSS passes the budget is
killed and reported as such. Results: ``bench/results/cpu-long_context-v{V}-h{H}.{json,csv,md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import harness, trl_step
IMPLS = ("trl", "grpo_kernels")
PHASES = ("loss_bwd", "logps", "model_bwd")
WARMUP_TOKENS = 64
CONFIG_KEYS = ("impl", "n", "vocab", "hidden", "batch", "completion", "prompt", "backend")
GIB = 1024.0  # MiB


# --------------------------------------------------------------------------------------------------
# one point, in a fresh process
# --------------------------------------------------------------------------------------------------
def _slice(x: dict, t: int) -> dict:
    """The batch with its completions cut to their first ``t`` tokens (the warm-up's shapes)."""
    y = dict(x)
    for k in ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps"):
        y[k] = x[k][:, :t].contiguous()
    y["num_items_in_batch"] = y["completion_mask"].sum()
    return y


def worker(cfg: dict) -> dict:
    torch.manual_seed(0)
    # TRL's config needs two generations per prompt; the batch the loss sees is the inputs' own (B may be 1)
    trainer = trl_step._build(cfg["impl"], dict(cfg, batch=max(2, cfg["batch"])))
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    full = trl_step._inputs(cfg)
    values = {}

    def phases(x: dict, record: bool) -> dict:
        T = x["completion_ids"].shape[1]
        ids = torch.cat([x["prompt_ids"], x["completion_ids"]], 1)
        attn = torch.cat([x["prompt_mask"], x["completion_mask"]], 1)

        def loss_bwd():
            model.zero_grad(set_to_none=True)
            loss = trainer._compute_loss(model, x)
            loss.backward()
            if record:
                values["loss"] = loss.item()
            model.zero_grad(set_to_none=True)  # the parameter gradients are the model's, not the loss's memory

        def logps():
            with torch.no_grad():
                lp, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, T, batch_size=cfg["batch"])
            if record:
                values["logps_sum"] = (lp * x["completion_mask"]).sum().item()

        g = torch.randn(ids.shape[0], T, cfg["hidden"], generator=torch.Generator().manual_seed(2))

        def model_bwd():
            model.zero_grad(set_to_none=True)
            h = model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            (h[:, -T - 1:-1] * g).sum().backward()
            model.zero_grad(set_to_none=True)

        todo = [("loss_bwd", loss_bwd), ("logps", logps)]
        if cfg["impl"] == "grpo_kernels":
            todo.append(("model_bwd", model_bwd))
        out = {}
        for name, fn in todo:
            if record:
                out[name] = harness.peak_rss_extra(fn)
            else:
                fn()
        return out

    phases(_slice(full, min(WARMUP_TOKENS, cfg["completion"])), record=False)
    out = {"impl": cfg["impl"], "n": cfg["n"], "vocab": cfg["vocab"], "status": "measured"}
    out.update(phases(full, record=True))
    out.update(values)  # the two implementations must compute the same numbers
    return out


# --------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------
def _available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _run_point(cfg: dict, limit_mib: float, log) -> dict:
    t0 = time.perf_counter()
    try:
        row = harness.run_fresh("bench.long_context", ["--worker", json.dumps(cfg)],
                                env={"MALLOC_MMAP_THRESHOLD_": "65536"}, rss_limit_mib=limit_mib, tail_lines=40)
    except harness.WorkerKilled as e:
        log(f"  killed: {e}")
        return {"impl": cfg["impl"], "n": cfg["n"], "vocab": cfg["vocab"], "status": "killed at budget",
                "rss_when_killed_mib": e.rss_mib}
    except harness.WorkerFailed as e:
        raise RuntimeError(f"worker {cfg['impl']} N={cfg['n']} failed:\n{e}") from None
    row["process_wall_s"] = time.perf_counter() - t0
    return row


def _line(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(intercept, slope) through the two largest measured points."""
    if len(points) < 2:
        return None
    (n0, y0), (n1, y1) = sorted(points)[-2:]
    slope = (y1 - y0) / (n1 - n0)
    return y0 - slope * n0, slope


def _fit(rows: list[dict], impl: str, phase: str, key: str) -> tuple[float, float] | None:
    return _line([(r["n"], r[phase][key]) for r in rows if r["impl"] == impl and r["status"] == "measured"
                  and phase in r])


def _extrapolate(rows, impl, n) -> dict:
    out = {}
    for phase in PHASES:
        for key in ("peak_extra_mib", "peak_rss_mib"):  # times under a varying load extrapolate to nonsense
            f = _fit(rows, impl, phase, key)
            if f is not None:
                out.setdefault(phase, {})[key] = f[0] + f[1] * n
    return out


def _longest(rows, impl, phase, limit_mib) -> dict | None:
    """The largest N whose extrapolated peak RSS (the whole process) stays within ``limit_mib``."""
    f = _fit(rows, impl, phase, "peak_rss_mib")
    if f is None:
        return None
    a, b = f
    measured = [r["n"] for r in rows if r["impl"] == impl and r["status"] == "measured"
                and r[phase]["peak_rss_mib"] <= limit_mib]
    return {"n": int((limit_mib - a) / b) if b > 0 else None, "largest_measured_within": max(measured, default=None),
            "intercept_mib": a, "slope_mib_per_token": b}


def _summary(rows: list[dict], ns: list[int], machine_gib: float) -> dict:
    s = {"longest_in_machine": {}, "ratios": []}
    for impl in IMPLS:
        s["longest_in_machine"][impl] = {ph: _longest(rows, impl, ph, machine_gib * GIB)
                                         for ph in ("loss_bwd", "logps")}
    for n in ns:
        r = {impl: next((x for x in rows if x["impl"] == impl and x["n"] == n), None) for impl in IMPLS}
        if None in r.values():
            continue

        def val(impl, phase):
            x = r[impl]
            src = x if x["status"] == "measured" else x.get("extrapolated", {})
            return src.get(phase, {}).get("peak_extra_mib"), x["status"] == "measured"

        (gk, gk_m), (tr, tr_m), (mb, mb_m) = val("grpo_kernels", "loss_bwd"), val("trl", "loss_bwd"), \
            val("grpo_kernels", "model_bwd")
        entry = {"n": n, "adapter_mib": gk, "trl_mib": tr, "model_mib": mb, "measured": gk_m and tr_m and mb_m}
        if gk is not None and tr:
            entry["adapter_over_trl"] = gk / tr
        if None not in (gk, tr, mb) and tr - mb > 0:
            entry["adapter_head_mib"] = gk - mb
            entry["trl_head_mib"] = tr - mb
            entry["head_adapter_over_trl"] = (gk - mb) / (tr - mb)
        s["ratios"].append(entry)
    return s


def _csv(rows: list[dict]) -> str:
    f = io.StringIO()
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["impl", "n", "vocab", "phase", "status", "ms", "peak_extra_mib", "peak_rss_mib"])
    for r in rows:
        for ph in PHASES:
            src = r.get(ph) if r["status"] == "measured" else r.get("extrapolated", {}).get(ph)
            if src is None:
                continue
            status = r["status"] if r["status"] == "measured" else f"{r['status']} (extrapolated)"
            w.writerow([r["impl"], r["n"], r["vocab"], ph, status, f"{src.get('ms', float('nan')):.0f}",
                        f"{src['peak_extra_mib']:.0f}", f"{src.get('peak_rss_mib', float('nan')):.0f}"])
    return f.getvalue()


def _fmt(x, spec=",.0f"):
    return "n/a" if x is None else format(x, spec)


ACCEPT_N, ACCEPT_RATIO = 16384, 0.10  # the adapter's loss+backward peak extra memory at most 0.1x TRL's at 16K


def _markdown(res: dict) -> str:
    e, c, s = res["environment"], res["config"], res["summary"]
    lines = [f"# Long completions: TRL 1.16 GRPOTrainer vs GRPOKernelsTrainer (V = {c['vocab']:,}, "
             f"H = {c['hidden']})", "",
             f"{e['device']}, {e['cpu_count']} CPUs, {e['mem_total_gib']:.0f} GiB, torch {e['torch']}, trl {e['trl']}, "
             f"transformers {e['transformers']}, commit {e['git_commit']}{' (dirty)' if e['git_dirty'] else ''}, "
             f"{e['date_utc']}. Command: `{res['command']}`", "",
             f"Model: {c['model']}; one point = {c['layout']} after a {c['prompt']}-token prompt; fp32; grpo_kernels "
             f"backend {c['backend']}. Budget per point {c['budget_gib']} GiB of RSS.", ""]
    acc = next((x for x in s["ratios"] if x["n"] == ACCEPT_N), None)
    if acc is not None and acc.get("adapter_over_trl") is not None:
        v = acc["adapter_over_trl"]
        lines += [f"**N = {ACCEPT_N:,}: the adapter's loss+backward peak extra memory is {v:.3f}x stock TRL's "
                  f"({_fmt(acc['adapter_mib'])} vs {_fmt(acc['trl_mib'])} MiB, "
                  f"{'measured' if acc['measured'] else 'partly extrapolated'}); goal <= {ACCEPT_RATIO}: "
                  f"{'met' if v <= ACCEPT_RATIO else 'missed'}. The loss head alone (minus the model's own "
                  f"forward+backward): {_fmt(acc.get('head_adapter_over_trl'), '.3f')}x.**", ""]
    lines += ["| N | phase | implementation | status | s | peak extra MiB | peak RSS MiB |",
              "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for ph in PHASES:
            src = r.get(ph) if r["status"] == "measured" else r.get("extrapolated", {}).get(ph)
            if src is None:
                continue
            st = "measured" if r["status"] == "measured" else f"{r['status']}: extrapolated"
            sec = None if src.get("ms") is None else src["ms"] / 1e3
            lines.append(f"| {r['n']:,} | {ph} | {r['impl']} | {st} | {_fmt(sec, '.1f')} "
                         f"| {_fmt(src['peak_extra_mib'])} | {_fmt(src.get('peak_rss_mib'))} |")
    lines += ["", "Loss + backward, peak extra memory (the model's own forward + backward without a head: "
              "`model_bwd`, the embedding's [V, H] gradient included; head = total minus that):", "",
              "| N | TRL MiB | adapter MiB | adapter / TRL | model only MiB | TRL head MiB | adapter head MiB | "
              "head: adapter / TRL | all measured |", "|---|---|---|---|---|---|---|---|---|"]
    for x in s["ratios"]:
        lines.append(f"| {x['n']:,} | {_fmt(x['trl_mib'])} | {_fmt(x['adapter_mib'])} | "
                     f"{_fmt(x.get('adapter_over_trl'), '.3f')} | {_fmt(x['model_mib'])} | "
                     f"{_fmt(x.get('trl_head_mib'))} | {_fmt(x.get('adapter_head_mib'))} | "
                     f"{_fmt(x.get('head_adapter_over_trl'), '.3f')} | "
                     f"{'yes' if x['measured'] else 'no (extrapolated)'} |")
    lines += ["", f"Longest N whose whole process (model, reference model, optimizer-free trainer, the phase) stays "
              f"within {c['machine_gib']:g} GiB of RSS, by linear extrapolation of the peak RSS through the two "
              "largest measured points:", "",
              "| implementation | phase | N | largest measured N within | slope MiB / 1K tokens |",
              "|---|---|---|---|---|"]
    for impl, d in s["longest_in_machine"].items():
        for ph, x in d.items():
            if x is not None:
                lines.append(f"| {impl} | {ph} | {_fmt(x['n'])} | {_fmt(x['largest_measured_within'])} | "
                             f"{x['slope_mib_per_token'] * 1024:.1f} |")
    lines += ["", res["note"], ""]
    return "\n".join(lines)


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("trl", "loss_bwd", "TRL 1.16 loss+backward", "C3"), ("grpo_kernels", "loss_bwd",
              "GRPOKernelsTrainer loss+backward", "C0"), ("grpo_kernels", "model_bwd",
              "model only (no head) fwd+bwd", "C2"), ("trl", "logps", "TRL log-prob pass", "C1"),
              ("grpo_kernels", "logps", "adapter log-prob pass", "C9")]
    for impl, ph, label, color in series:
        meas = [(r["n"], r[ph]) for r in res["rows"] if r["impl"] == impl and r["status"] == "measured" and ph in r]
        extra = [(r["n"], r["extrapolated"][ph]) for r in res["rows"] if r["impl"] == impl
                 and r["status"] != "measured" and ph in r.get("extrapolated", {})]
        if not meas:
            continue
        style = "--" if ph != "loss_bwd" else "-"
        for ax, key, scale in ((ax_m, "peak_extra_mib", 1 / GIB), (ax_t, "ms", 1e-3)):
            ax.plot([n for n, _ in meas], [v[key] * scale for _, v in meas], style, marker="o", color=color,
                    label=label)
            ext = [(n, v[key]) for n, v in extra if key in v]
            if ext:
                ax.plot([meas[-1][0]] + [n for n, _ in ext], [meas[-1][1][key] * scale] + [v * scale for _, v in ext],
                        ":", marker="x", color=color)
    for ax, ylabel in ((ax_m, "peak extra memory (GiB)"), (ax_t, "time (s, machine under load)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("completion tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7)
    c = res["config"]
    fig.suptitle(f"V = {c['vocab']:,}, H = {c['hidden']}, fp32, CPU ({c['layout']}); x: extrapolated, not run",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time_guess_s(rows: list[dict], impl: str, n: int) -> float | None:
    """The process time of the point, a power law through the two largest measured points (attention is
    quadratic in N, so a straight line would promise too little)."""
    pts = sorted((r["n"], r["process_wall_s"]) for r in rows if r["impl"] == impl and r.get("process_wall_s"))
    if len(pts) < 2:
        return None
    (n0, t0), (n1, t1) = pts[-2:]
    k = max(1.0, math.log(t1 / t0) / math.log(n1 / n0)) if t0 > 0 and t1 > 0 else 1.0
    return t1 * (n / n1) ** k


def _same_point(row: dict, cfg: dict) -> bool:
    return all(row.get("config", {}).get(k) == cfg[k] for k in CONFIG_KEYS)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", default="1024,2048,4096,8192,16384,32768", help="comma-separated completion tokens N")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (default 151,936)")
    p.add_argument("--hidden", type=int, default=256, help="model hidden size H (default 256)")
    p.add_argument("--completion", type=int, default=None,
                   help="tokens per sequence T, B = N / T (default: T = N, one sequence)")
    p.add_argument("--prompt", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--backend", default="auto", help="grpo_kernels backend (default auto)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}, run in this order per N")
    p.add_argument("--budget-gib", type=float, default=14.0, help="RSS budget per point (default 14)")
    p.add_argument("--machine-gib", type=float, default=24.0, help="memory for the 'longest N that fits' (default 24)")
    p.add_argument("--deadline-min", type=float, default=None,
                   help="minutes from the start after which no point is started that would not finish in time "
                        "(its time extrapolated from the previous points); such points are reported as not run")
    p.add_argument("--rows", default=None,
                   help="JSON-lines file of measured points: each new point is appended, and points already in it "
                        "(same configuration) are reused instead of measured again (a long run can be resumed)")
    p.add_argument("--note", default="", help="a sentence added to the result's note (how the run was made)")
    p.add_argument("--out", default=str(harness.RESULTS_DIR), help="results directory")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return {}
    ns = sorted(int(n) for n in a.n.split(","))
    impls = [i for i in a.impls.split(",") if i]
    if not impls or set(impls) - set(IMPLS):
        p.error(f"--impls must be a comma list of {IMPLS}, got {a.impls!r}")
    for n in ns:
        if a.completion is not None and n % min(a.completion, n):
            p.error(f"--n ({n}) must be a multiple of --completion ({a.completion})")
    start = time.monotonic()
    env = harness.environment(torch.device("cpu"), "trl", "transformers")
    with open("/proc/meminfo") as f:
        env["mem_total_gib"] = int(f.readline().split()[1]) / 2**20
    load = harness.LoadMeter()
    out_dir = tempfile.mkdtemp(prefix="long_context_")  # models and trainer output
    budget = a.budget_gib * GIB
    stored = []
    if a.rows and Path(a.rows).exists():
        stored = [json.loads(line) for line in Path(a.rows).read_text().splitlines() if line.strip()]
    rows: list[dict] = []
    measured_here = 0  # points measured by this run, not reused
    log = lambda s: print(s, flush=True)  # noqa: E731
    layout = "one completion of N tokens (B = 1)" if a.completion is None else f"B = N / {a.completion} sequences"

    def result() -> dict:
        others = load.others_cpus()
        return dict(
            op="long_context",
            config=dict(n=ns, vocab=a.vocab, hidden=a.hidden, completion=a.completion, prompt=a.prompt,
                        backend=a.backend, dtype="fp32", layout=layout, budget_gib=a.budget_gib,
                        machine_gib=a.machine_gib, warmup_tokens=WARMUP_TOKENS,
                        model="Qwen2ForCausalLM, 2 layers, 4 heads, untied head, sdpa"),
            environment=env, rows=rows, summary=_summary(rows, ns, a.machine_gib),
            command="python -m bench.long_context " + " ".join(argv if argv is not None else sys.argv[1:]),
            note=("Memory: peak RSS (VmHWM, reset before the phase) minus the RSS before it, one measured run "
                  "per phase after a 64-token warm-up, fresh process per (implementation, N), "
                  "MALLOC_MMAP_THRESHOLD_=65536. Times: one run each, on a machine shared with other jobs"
                  + (f" (other processes used {others:.2f} CPUs of {os.cpu_count()} on average while this run "
                     "measured)" if others is not None and measured_here else "") + ": indicative only."
                  + (" " + a.note if a.note else "")))

    for n in ns:
        T = n if a.completion is None else min(a.completion, n)
        for impl in impls:
            cfg = dict(impl=impl, n=n, vocab=a.vocab, hidden=a.hidden, batch=n // T, completion=T, prompt=a.prompt,
                       backend=a.backend, out_dir=out_dir)
            guess = _extrapolate(rows, impl, n)
            old = next((r for r in stored if _same_point(r, cfg)), None)
            need = max((v["peak_rss_mib"] for v in guess.values() if "peak_rss_mib" in v), default=0.0)
            avail = _available_mib()
            limit = budget if avail is None else min(budget, avail - 1024)
            t_guess = _time_guess_s(rows, impl, n)
            left = None if a.deadline_min is None else a.deadline_min * 60 - (time.monotonic() - start)
            if old is not None:
                row = old
                log(f"N={n} {impl}: reused from {a.rows}")
            elif need > limit:
                log(f"N={n} {impl}: not run, extrapolated peak RSS {need:.0f} MiB > {limit:.0f} MiB")
                row = {"impl": impl, "n": n, "vocab": a.vocab, "status": "not run", "extrapolated": guess,
                       "reason": f"extrapolated peak RSS {need:.0f} MiB over the limit {limit:.0f} MiB"}
            elif left is not None and t_guess is not None and t_guess > left:
                log(f"N={n} {impl}: not run, extrapolated time {t_guess:.0f} s > {left:.0f} s left")
                row = {"impl": impl, "n": n, "vocab": a.vocab, "status": "not run (time)", "extrapolated": guess,
                       "reason": f"extrapolated process time {t_guess:.0f} s, {max(left, 0):.0f} s left of the "
                                 "run's deadline"}
            else:
                row = _run_point(cfg, limit, log)
                measured_here += 1
                row["config"] = {k: cfg[k] for k in CONFIG_KEYS}
                if row["status"] != "measured":
                    row["extrapolated"] = guess
                if a.rows:
                    with open(a.rows, "a") as f:
                        f.write(json.dumps(row) + "\n")
            rows.append(row)
            if row["status"] == "measured":
                log(f"N={n} {impl}: " + ", ".join(f"{ph} {row[ph]['ms'] / 1e3:.1f} s +{row[ph]['peak_extra_mib']:.0f} "
                                                   f"MiB (RSS {row[ph]['peak_rss_mib']:.0f})"
                                                   for ph in PHASES if ph in row))
            write(result(), a.out)  # after every point: a run stopped early keeps what it measured
    return result()


def write(res: dict, out_dir) -> list[Path]:
    """The result files of ``res``: JSON, CSV, Markdown and the plot (also to regenerate them from the JSON)."""
    c = res["config"]
    stem = f"cpu-long_context-v{c['vocab']}-h{c['hidden']}"
    paths = harness.write_results(out_dir, stem, res, _markdown(res), csv=_csv(res["rows"]))
    paths.append(Path(out_dir) / f"{stem}.png")
    _plot(res, paths[-1])
    return paths


if __name__ == "__main__":
    main()
