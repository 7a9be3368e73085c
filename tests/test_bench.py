"""Smoke tests of the benchmark scripts (bench/): tiny sizes, every script once, the result fields checked.

They check that the harness measures what it says: the reference row's loss equals grpo_kernels' own
value, every other row (TRL's own code, the fused backends, their inplace=True form) agrees with it, the
reference's saved tensors and peak memory hold at least the N x V tensors it is known to allocate, targets
report met / missed with the shortfall, the report regenerates the Markdown, the plot and the README table
from the JSON, and the latency and GRPO-vs-PPO scripts run and report what they say.
"""

import json
import os

import pytest
import torch

import grpo_kernels
from bench import _trl, cpu_isa, gpu, grpo_vs_ppo, harness, latency, logprobs, loss, report, runner, train_step

N, V = 128, 4000  # N x V fp32 = 2 MB: large enough for RSS accounting (pages, mmap) to see it
TINY = ["--n", str(N), "--v", str(V), "--device", "cpu", "--repeats", "2", "--warmup", "1", "--t", "64"]


@pytest.fixture(scope="module")
def loss_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = loss.main(TINY + ["--dtype", "fp32", "--skip", "compile", "--out", str(out)])
    return out, result


def _check_timing(row):
    for ph in ("fwd", "bwd", "fwd_bwd"):
        s = row[ph]
        assert len(s["times_ms"]) == 2
        assert 0 < s["min_ms"] <= s["median_ms"] <= s["max_ms"]


def test_loss_json_fields(loss_run):
    out, result = loss_run
    on_disk = json.loads((out / "cpu-loss-n128-v4000-fp32.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(result["rows"]))
    env = on_disk["env"]
    for key in ("device", "cpu", "torch", "triton", "python", "git_commit", "date_utc", "torch_threads",
                "other_processes_cpus"):
        assert key in env
    assert env["torch_threads"] == torch.get_num_threads()
    fl = on_disk["floor"]
    assert fl["copy_GBps"] > 0 and fl["exp_Gps"] > 0
    f = fl["phases"]["fwd_bwd"]
    assert f["bytes"] == 2 * N * V * 4 and f["exps"] == N * V
    assert f["floor_ms"] == max(f["bytes_ms"], f["exps_ms"])
    impls = [r["impl"] for r in on_disk["rows"]]
    assert impls[0] == "trl" and impls[-1] == "reference"
    # every fused backend available here is benchmarked (triton on CPU only runs in its interpreter)
    for name in grpo_kernels.available_backends("cpu"):
        if name not in ("torch", "triton"):
            assert name in impls and f"{name}_inplace" in impls
    skipped = {s["impl"]: s["reason"] for s in on_disk["skipped"]}
    assert "compile" in skipped and "liger" in skipped and "cuda" in skipped
    for row in on_disk["rows"]:
        _check_timing(row)
        fb = row["fwd_bwd"]
        assert fb["p50_ms"] in fb["times_ms"] and fb["p90_ms"] in fb["times_ms"] and fb["p90_ms"] <= fb["max_ms"]
        assert fb["first_ms"] > 0  # the warm-up repeat, one-off costs included
        assert fb["speedup_vs_trl"] == pytest.approx(runner.row_of(on_disk, "trl")["fwd_bwd"]["median_ms"]
                                                     / fb["median_ms"])
        assert fb["speedup_vs_compile"] is None  # compile was skipped
        assert row["fwd_bwd"]["GBps"] > 0 and row["fwd_bwd"]["x_floor"] > 0
        assert row["peak_extra_bytes"] is not None, row.get("memory_error")
        assert row["saved_bytes_per_token"] >= 0
    assert (out / "cpu-loss-n128-v4000-fp32.md").read_text().startswith("# bench.loss")


def test_loss_rows_compute_the_same_loss(loss_run):
    _, result = loss_run
    args = runner.parse(loss, TINY + ["--dtype", "fp32"])
    x = loss.make_inputs(args, torch.device("cpu"))
    expected = grpo_kernels.grpo_loss(
        loss.logits_of(x), x["ids"], completion_mask=x["mask"], advantages=x["advantages"],
        old_logps=x["old_logps"], ref_logps=x["ref_logps"], beta=args.beta, backend="torch").loss.item()
    for row in result["rows"]:
        assert row["value"] == pytest.approx(expected, rel=1e-4, abs=1e-5), row["impl"]


def test_reference_memory_and_saved_bytes_hold_its_nxv_tensors(loss_run):
    _, result = loss_run
    ref = runner.row_of(result, "reference")
    # the reference saves its fp32 log-softmax [N, V] for backward and returns an N x V gradient
    assert ref["saved_bytes_per_token"] >= 4 * V
    assert ref["peak_extra_bytes"] >= result["grad_buffer_bytes"]


def test_targets_report_shortfall():
    res = {"config": {"device": "cpu", "n": 2048, "v": 32000, "dtype": "fp32"}, "skipped": [],
           "rows": [{"impl": "reference", "fwd_bwd": {"median_ms": 300.0}},
                    {"impl": "compile", "fwd_bwd": {"median_ms": 120.0}},
                    {"impl": "cpu", "fwd_bwd": {"median_ms": 100.0, "x_floor": 2.0}, "peak_extra_x_grad": 1.1}]}
    t = {x["target"]: x for x in loss.targets(res)}
    assert t["cpu fwd+bwd speed-up vs reference"]["status"] == "met"  # 3.0 >= 3
    vs_compile = t["cpu fwd+bwd speed-up vs torch.compile"]
    assert vs_compile["status"] == "missed" and vs_compile["value"] == pytest.approx(1.2)
    assert "missed by a factor 1.25" in vs_compile["detail"]
    assert t["cpu fwd+bwd time / floor (max of copy and exp time)"]["status"] == "missed"
    assert "missed by a factor 1.33" in t["cpu fwd+bwd time / floor (max of copy and exp time)"]["detail"]
    assert t["cpu peak extra memory / one N x V gradient buffer"]["status"] == "met"
    res["rows"] = res["rows"][:2]
    res["skipped"] = [{"impl": "cpu", "reason": "the extension is not built"}]
    assert all(x["status"] == "not measured" and "not built" in x["detail"] for x in loss.targets(res))


def test_logprobs_smoke(tmp_path):
    result = logprobs.main(TINY + ["--dtype", "bf16", "--skip", "compile", "--no-memory", "--layout", "view",
                                   "--out", str(tmp_path)])
    assert (tmp_path / "cpu-logprobs-n128-v4000-bf16.json").exists()
    ref = runner.row_of(result, "reference")
    _check_timing(ref)
    assert result["floor"]["phases"]["fwd_bwd"]["bytes"] == 3 * N * V * 2  # two passes: read, read + write
    assert runner.row_of(result, "trl") is not None
    for row in result["rows"]:  # bf16 logits: TRL's log-softmax runs in bf16 (eps 2^-8 relative)
        assert row["value"] == pytest.approx(ref["value"], rel=2e-3, abs=1e-3), row["impl"]


def test_train_step_smoke(tmp_path):
    result = train_step.main(TINY + ["--dtype", "fp32", "--hidden", "16", "--layers", "1", "--prompt", "4",
                                     "--skip", "compile,liger_chunked", "--no-memory", "--out", str(tmp_path)])
    assert result["op"] == "train_step" and "floor" not in result
    ref = runner.row_of(result, "reference")
    _check_timing(ref)
    impls = {row["impl"] for row in result["rows"]}
    assert {"trl", "trl_fused_head"} <= impls
    for row in result["rows"]:
        assert row["value"] == pytest.approx(ref["value"], rel=1e-4, abs=1e-5), row["impl"]


def test_report_regenerates_md_png_and_readme(loss_run, tmp_path):
    out, result = loss_run
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nstale\n{report.END}\nrest\n")
    (out / "cpu-loss-n128-v4000-fp32.md").write_text("stale")
    assert report.main(["--results", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| CPU loss N=128 V=4000 fp32 | `reference` |" in text and "| CPU loss N=128 V=4000 fp32 | `trl` |" in text
    assert (out / "cpu-loss-n128-v4000-fp32.md").read_text() == runner.markdown(result)
    assert (out / "summary.png").stat().st_size > 0
    readme.write_text("no markers\n")
    assert report.main(["--results", str(out), "--readme", str(readme), "--no-plot"]) == 1


@pytest.mark.skipif("cpu" not in grpo_kernels.available_backends("cpu"), reason="the C++ CPU module is not built")
def test_cpu_isa_smoke(capsys):
    from grpo_kernels import _cpu

    default = _cpu.isa()
    cpu_isa.main(["--n", "8", "--v", "100", "--repeats", "1"])
    text = capsys.readouterr().out
    assert "torch.exp" in text and _cpu.isa() == default
    for isa in _cpu.ISAS:  # every build appears for each dtype, timed or with the reason it did not run
        assert text.count(f" {isa} ") == 2, text


def test_gpu_fused_kernels_smoke(request):
    """``--ops fused_kernels`` on the CPU emulation of the CUDA kernels: both fused kernels time, with their
    passes and HBM bytes, and the command is part of the suite."""
    from cuda_emu_build import CXX

    if CXX is None:
        pytest.skip("g++ is needed to build the CUDA emulation module")
    emu = request.getfixturevalue("emu")
    rows = gpu.time_fused_kernels(8, [203], repeats=1, warmup=0, module=emu, device="cpu", dtype=torch.float32)
    assert [(r["kernel"], r["cluster"], r["passes"]) for r in rows] == [("fused_kernel", 1, 3),
                                                                          ("fused_cluster_kernel", 2, 2)]
    assert all(r["median_ms"] > 0 and r["hbm_bytes"] > 8 * 203 * 4 for r in rows)
    md = gpu.fused_kernels_markdown(rows, "emulator")
    assert "fused_cluster_kernel | 2 | 2 |" in md and "fused_kernel | 1 | 3 |" in md


def test_gpu_dry_run_lists_the_fused_kernel_run(capsys):
    gpu.main(["--dry-run", "--ops", "fused_kernels", "--v", "32000,151936"])
    assert "-m bench.gpu --fused-kernels-now --n 8192 --v 32000,151936 --dtype bf16" in capsys.readouterr().out


def test_gpu_check_reports_missing_pieces():
    ok, lines = gpu.check()
    assert ok == torch.cuda.is_available()
    if not ok:
        assert any("MISSING" in line and "CUDA device" in line for line in lines)


@pytest.mark.parametrize("layout", ["contiguous", "view"])
def test_liger_row_computes_our_loss_and_gradient(layout):
    """The Liger row is only meaningful if it gets the same options; checked on CPU under the Triton
    interpreter (conftest sets TRITON_INTERPRET=1 without a GPU), which the benchmark itself never times."""
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("Liger's Triton kernel needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = runner.parse(loss, ["--n", "32", "--v", "300", "--t", "16", "--dtype", "fp32", "--device", dev,
                               "--layout", layout])
    x = loss.make_inputs(args, torch.device(dev))
    results = {}
    for impl in ("reference", "liger"):
        case = loss.build(impl, x, args)
        value = case.forward()
        case.backward(value)
        grad = case.leaves[0].grad
        results[impl] = (value.item(), grad[:, :16] if grad.shape[1] == 17 else grad)
        case.leaves[0].grad = None
    assert results["liger"][0] == pytest.approx(results["reference"][0], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(results["liger"][1], results["reference"][1], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# the trl and inplace rows, bench.latency, bench.grpo_vs_ppo
# --------------------------------------------------------------------------------------------------
def _value_and_grad(case):
    for t in case.leaves:
        t.grad = None
    if case.setup is not None:
        case.setup()
    value = case.forward()
    case.backward(value)
    return value.item(), case.leaves[0].grad.clone()


@pytest.mark.parametrize("loss_type,level,beta", [("dapo", "token", 0.04), ("grpo", "sequence", 0.0),
                                                  ("bnpo", "token", 0.04)])
def test_trl_row_runs_trls_own_compute_loss(loss_type, level, beta):
    """The trl row is TRL's method itself (not a copy), fed by TRL's log-prob function, and computes the loss,
    the gradient and the metrics of grpo_kernels' float64-capable reference (fp32 logits: the two sum in
    different orders, so agreement to a few fp32 ulps of the values involved)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    args = runner.parse(loss, ["--n", "64", "--v", "300", "--t", "16", "--dtype", "fp32", "--device", "cpu",
                               "--loss-type", loss_type, "--level", level, "--beta", str(beta)])
    x = loss.make_inputs(args, torch.device("cpu"))
    trainer = _trl.trainer_on_logits(loss.config(args), lambda: x["leaf"], x["ids"], x["mask"])
    assert type(trainer)._compute_loss is GRPOTrainer._compute_loss
    case = loss.build("trl", x, args)
    got, got_grad = _value_and_grad(case)
    want, want_grad = _value_and_grad(loss.build("reference", x, args))
    eps = torch.finfo(torch.float32).eps
    assert got == pytest.approx(want, rel=64 * eps, abs=64 * eps)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=64 * eps * want_grad.abs().max().item())


def test_trl_trainer_logs_trls_metrics():
    args = runner.parse(loss, ["--n", "32", "--v", "100", "--t", "16", "--dtype", "fp32", "--device", "cpu"])
    x = loss.make_inputs(args, torch.device("cpu"))
    trainer = _trl.trainer_on_logits(loss.config(args), lambda: x["leaf"], x["ids"], x["mask"])
    batch = _trl.loss_inputs(x["ids"], x["mask"], x["advantages"], x["old_logps"], x["ref_logps"])
    trainer._compute_loss(None, batch)
    out = grpo_kernels.grpo_loss(x["leaf"], x["ids"], completion_mask=x["mask"], advantages=x["advantages"],
                                 old_logps=x["old_logps"], ref_logps=x["ref_logps"], beta=args.beta, backend="torch")
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for k, v in out.metrics.items():  # TRL computed its metrics on the same batch (its entropy in fp32)
        assert metrics[k] == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k


@pytest.mark.skipif("cpu" not in grpo_kernels.available_backends("cpu"), reason="the C++ CPU module is not built")
@pytest.mark.parametrize("layout", ["contiguous", "view"])
def test_inplace_row_restores_its_logits_and_keeps_the_shared_leaf(layout):
    args = runner.parse(loss, ["--n", "64", "--v", "300", "--t", "16", "--dtype", "fp32", "--device", "cpu",
                               "--layout", layout])
    x = loss.make_inputs(args, torch.device("cpu"))
    shared = x["leaf"].detach().clone()
    want, want_grad = _value_and_grad(loss.build("reference", x, args))
    case = loss.build("cpu_inplace", x, args)
    eps = torch.finfo(torch.float32).eps
    for _ in range(2):  # the second repeat sees the restored logits, not the gradient the first wrote
        got, grad = _value_and_grad(case)
        assert got == pytest.approx(want, rel=64 * eps, abs=64 * eps)
        if layout == "view":
            grad = grad[:, :-1]
        torch.testing.assert_close(grad, want_grad[:, :-1] if layout == "view" else want_grad, rtol=0,
                                   atol=64 * eps * want_grad.abs().max().item())
    assert torch.equal(x["leaf"].detach(), shared)


def test_percentile_is_nearest_rank():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert harness.percentile(xs, 50) == 3.0 and harness.percentile(xs, 90) == 5.0 and harness.percentile(xs, 0) == 1.0


def test_peak_rss_extra_sees_a_torch_allocation():
    """64 MiB of torch memory, allocated and freed inside the measured call: tracemalloc would see none of it."""
    m = harness.peak_rss_extra(lambda: torch.ones(16 * 2**20).sum())
    assert m["peak_extra_mib"] >= 60 and m["peak_rss_mib"] >= m["rss_before_mib"] + 60 and m["ms"] > 0


def test_run_fresh_returns_json_reports_failures_and_kills_at_the_rss_limit(tmp_path):
    (tmp_path / "x.json").write_text('{"a": [1, 2]}')
    assert harness.run_fresh("json.tool", ["--compact", str(tmp_path / "x.json")]) == {"a": [1, 2]}
    with pytest.raises(harness.WorkerFailed, match="No module named"):
        harness.run_fresh("bench.no_such_module", [])
    with pytest.raises(harness.WorkerKilled) as e:  # 200 MB touched, then 5 s asleep: killed long before
        harness.run_fresh("timeit", ["-n", "1", "-r", "1", "x = bytearray(200_000_000); import time; time.sleep(5)"],
                          rss_limit_mib=100, timeout=60)
    assert e.value.rss_mib > 100


@pytest.mark.skipif("cpu" not in grpo_kernels.available_backends("cpu"), reason="the C++ CPU module is not built")
def test_latency_smoke(tmp_path, capsys):
    r = latency.main(["--n", "64", "--v", "500", "--t", "16", "--calls", "4", "--out", str(tmp_path)])
    out = tmp_path / "cpu-latency-n64-v500-fp32.json"
    assert "| first call ms |" in (tmp_path / "cpu-latency-n64-v500-fp32.md").read_text()
    assert r["calls"] == 4 and len(r["times_ms"]) == 4 and r["first_ms"] == r["times_ms"][0]
    steady = r["times_ms"][1:]
    assert r["steady_max_ms"] == max(steady) and r["steady_p50_ms"] in steady
    assert r["steady_max_over_median"] >= 1.0
    assert json.loads(out.read_text())["config"]["n"] == 64
    assert "steady (calls 2-4)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        latency.main(["--calls", "1"])


def test_gae_matches_the_recursion_by_hand():
    """gamma = 1, lambda = 0.95: A_t = delta_t + 0.95 A_{t+1}, delta_t = r_t + V_{t+1} - V_t, zero past the end."""
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.25, 0.75, 9.0]])  # the last position is masked: its value must not leak in
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = grpo_vs_ppo.gae(r, v, m)
    a2 = 1.0 + 0.0 - 0.75
    a1 = 0.0 + 0.75 - 0.25 + 0.95 * a2
    a0 = 0.0 + 0.25 - 0.5 + 0.95 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, adv + v * m)


@pytest.mark.skipif("cpu" not in grpo_kernels.available_backends("cpu"), reason="the C++ CPU module is not built")
def test_grpo_vs_ppo_smoke(tmp_path):
    pytest.importorskip("transformers")
    result = grpo_vs_ppo.main(["--sizes", "tiny", "--vocab", "256", "--prompt", "4", "--completion", "8",
                               "--steps", "1", "--out", str(tmp_path)])
    grpo, ppo = result["rows"]
    assert (grpo["algo"], ppo["algo"]) == ("grpo", "ppo")
    h, layers, _, _, inter = grpo_vs_ppo.SIZES["tiny"]
    # the critic is the policy's backbone with a 1-wide head instead of the [V, H] LM head
    assert ppo["trained_params"] - grpo["trained_params"] == grpo["trained_params"] - 256 * h + h
    for r in (grpo, ppo):  # fp32 AdamW: params + grads + 2 moments, plus the frozen reference's params
        extra = r["state_bytes"] - (4 * 4 * r["trained_params"] + 4 * grpo["trained_params"])
        assert 0 <= extra < 1024 and extra % 4 == 0  # AdamW's step counters: one fp32 scalar per parameter tensor
        assert r["peak_bytes"] > 0 and r["step_ms"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
    assert ppo["state_bytes_vs_grpo"] == pytest.approx(ppo["state_bytes"] / grpo["state_bytes"])
    md = (tmp_path / "cpu-grpo_vs_ppo.md").read_text()
    assert "generation is excluded" in md and "| tiny | PPO |" in md
    assert (tmp_path / "grpo_vs_ppo.png").stat().st_size > 0
    assert report.load(tmp_path) == []  # not a bench.runner result: the README table ignores it


def test_gpu_dry_run_lists_trl_step_only_when_present(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "TRL_STEP", tmp_path / "absent.py")
    assert gpu.trl_step_command(type("A", (), {"dtype": "bf16", "repeats": 3, "warmup": 1})()) is None
    fake = tmp_path / "trl_step.py"
    fake.write_text("")
    monkeypatch.setattr(gpu, "TRL_STEP", fake)
    monkeypatch.setattr(gpu.subprocess, "run", lambda *a, **k: type("P", (), {"stdout": "usage: [--device D] [--dtype T]"})())
    cmd = gpu.trl_step_command(type("A", (), {"dtype": "bf16", "repeats": 3, "warmup": 1})())
    assert cmd[1:] == ["-m", "bench.trl_step", "--device", "cuda", "--dtype", "bf16"]


def test_trl_step_smoke(tmp_path):
    """bench.trl_step at a tiny size: both trainers, both V, the same loss and log-probs, the result files."""
    pytest.importorskip("trl")
    from bench import trl_step

    res = trl_step.main(["--n", "128", "--completion", "32", "--hidden", "32", "--vocab", "300,600", "--repeats", "1",
                         "--backend", "torch", "--out", str(tmp_path)])
    rows = {(r["impl"], r["vocab"]): r for r in res["rows"]}
    assert set(rows) == {(i, v) for i in trl_step.IMPLS for v in (300, 600)}
    for v in (300, 600):
        ours, theirs = rows[("grpo_kernels", v)], rows[("trl", v)]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)
        assert ours["logps_sum"] == pytest.approx(theirs["logps_sum"], rel=1e-4)
        for r in (ours, theirs):
            for ph in ("loss_bwd", "logps"):
                assert 0 < r[ph]["median_ms"] <= r[ph]["worst_ms"] and r[ph]["peak_extra_mib"] >= 0
    assert len(res["targets"]) == 9
    md = (tmp_path / "cpu-trl_step-n128-h32.md").read_text()
    assert "| 300 | loss_bwd | trl |" in md and res["environment"]["trl"]


def test_long_context_smoke(tmp_path, monkeypatch):
    """bench.long_context at a tiny size: both trainers agree, the model-only phase runs, the files are written;
    a second run reuses the stored points and marks a point over the RSS budget as not run, extrapolated."""
    pytest.importorskip("trl")
    from bench import long_context

    rows_file = tmp_path / "rows.jsonl"
    common = ["--vocab", "300", "--hidden", "32", "--prompt", "8", "--backend", "torch", "--rows", str(rows_file)]
    res = long_context.main(["--n", "64,128", "--out", str(tmp_path), *common])
    by = {(r["impl"], r["n"]): r for r in res["rows"]}
    assert set(by) == {(i, n) for i in long_context.IMPLS for n in (64, 128)}
    for n in (64, 128):
        ours, theirs = by[("grpo_kernels", n)], by[("trl", n)]
        assert ours["status"] == theirs["status"] == "measured"
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)
        assert ours["logps_sum"] == pytest.approx(theirs["logps_sum"], rel=1e-4)
        assert "model_bwd" in ours and "model_bwd" not in theirs
        for r in (ours, theirs):
            assert r["loss_bwd"]["ms"] > 0 and r["loss_bwd"]["peak_rss_mib"] >= r["loss_bwd"]["rss_before_mib"]
    assert [x["n"] for x in res["summary"]["ratios"]] == [64, 128]
    for ext in ("json", "csv", "md", "png"):
        assert (tmp_path / f"cpu-long_context-v300-h32.{ext}").stat().st_size > 0
    assert len(rows_file.read_text().splitlines()) == 4

    def no_measuring(*a, **k):
        raise AssertionError("a stored point was measured again")

    monkeypatch.setattr(long_context, "_run_point", no_measuring)
    res = long_context.main(["--n", "64,128,1024", "--budget-gib", "0.01", "--out", str(tmp_path), *common])
    new = [r for r in res["rows"] if r["n"] == 1024]
    assert [r["status"] for r in new] == ["not run", "not run"]
    for r in new:
        assert r["extrapolated"]["loss_bwd"]["peak_extra_mib"] > 0 and "over the limit" in r["reason"]
    assert "not run: extrapolated" in (tmp_path / "cpu-long_context-v300-h32.md").read_text()
