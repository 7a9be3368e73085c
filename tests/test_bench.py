"""Smoke tests of the benchmark scripts (bench/): tiny sizes, every script once, the result fields checked.

They check that the harness measures what it says: the eager row's loss equals grpo_kernels' own value,
every fused row agrees with it, the eager reference's saved tensors and peak memory hold at least the
N x V tensors it is known to allocate, targets report met / missed with the shortfall, and the report
regenerates the Markdown, the plot and the README table from the JSON.
"""

import json
import os

import pytest
import torch

import grpo_kernels
from bench import cpu_isa, gpu, logprobs, loss, report, runner, train_step
from test_cuda_emu import emu  # noqa: F401  (the fixture of the fused-kernels smoke test)

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
    assert impls[0] == "eager"
    # every fused backend available here is benchmarked (triton on CPU only runs in its interpreter)
    for name in grpo_kernels.available_backends("cpu"):
        if name not in ("torch", "triton"):
            assert name in impls
    skipped = {s["impl"]: s["reason"] for s in on_disk["skipped"]}
    assert "compile" in skipped and "liger" in skipped and "cuda" in skipped
    for row in on_disk["rows"]:
        _check_timing(row)
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


def test_eager_memory_and_saved_bytes_hold_its_nxv_tensors(loss_run):
    _, result = loss_run
    eager = runner.row_of(result, "eager")
    # the reference saves its fp32 log-softmax [N, V] for backward and returns an N x V gradient
    assert eager["saved_bytes_per_token"] >= 4 * V
    assert eager["peak_extra_bytes"] >= result["grad_buffer_bytes"]


def test_targets_report_shortfall():
    res = {"config": {"device": "cpu", "n": 2048, "v": 32000, "dtype": "fp32"}, "skipped": [],
           "rows": [{"impl": "eager", "fwd_bwd": {"median_ms": 300.0}},
                    {"impl": "compile", "fwd_bwd": {"median_ms": 120.0}},
                    {"impl": "cpu", "fwd_bwd": {"median_ms": 100.0, "x_floor": 2.0}, "peak_extra_x_grad": 1.1}]}
    t = {x["target"]: x for x in loss.targets(res)}
    assert t["cpu fwd+bwd speed-up vs eager"]["status"] == "met"  # 3.0 >= 3
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
    eager = runner.row_of(result, "eager")
    _check_timing(eager)
    assert result["floor"]["phases"]["fwd_bwd"]["bytes"] == 3 * N * V * 2  # two passes: read, read + write
    for row in result["rows"]:
        assert row["value"] == pytest.approx(eager["value"], rel=2e-3, abs=1e-3), row["impl"]


def test_train_step_smoke(tmp_path):
    result = train_step.main(TINY + ["--dtype", "fp32", "--hidden", "16", "--layers", "1", "--prompt", "4",
                                     "--skip", "compile,liger_chunked", "--no-memory", "--out", str(tmp_path)])
    assert result["op"] == "train_step" and "floor" not in result
    eager = runner.row_of(result, "eager")
    _check_timing(eager)
    for row in result["rows"]:
        assert row["value"] == pytest.approx(eager["value"], rel=1e-4, abs=1e-5), row["impl"]


def test_report_regenerates_md_png_and_readme(loss_run, tmp_path):
    out, result = loss_run
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nstale\n{report.END}\nrest\n")
    (out / "cpu-loss-n128-v4000-fp32.md").write_text("stale")
    assert report.main(["--results", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| CPU loss N=128 V=4000 fp32 | `eager` |" in text
    assert (out / "cpu-loss-n128-v4000-fp32.md").read_text() == runner.markdown(result)
    assert (out / "summary.png").stat().st_size > 0
    readme.write_text("no markers\n")
    assert report.main(["--results", str(out), "--readme", str(readme), "--no-plot"]) == 1


@pytest.mark.skipif("cpu" not in grpo_kernels.available_backends("cpu"), reason="the C++ CPU module is not built")
def test_cpu_isa_smoke(capsys):
    from grpo_kernels import _C

    default = _C.isa()
    cpu_isa.main(["--n", "8", "--v", "100", "--repeats", "1"])
    text = capsys.readouterr().out
    assert "torch.exp" in text and _C.isa() == default
    for isa in _C.ISAS:  # every build appears for each dtype, timed or with the reason it did not run
        assert text.count(f" {isa} ") == 2, text


def test_gpu_fused_kernels_smoke(request):
    """``--ops fused_kernels`` on the CPU emulation of the CUDA kernels: both fused kernels time, with their
    passes and HBM bytes, and the command is part of the suite."""
    from test_cuda_emu import CXX

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
    for impl in ("eager", "liger"):
        case = loss.build(impl, x, args)
        value = case.forward()
        case.backward(value)
        grad = case.leaves[0].grad
        results[impl] = (value.item(), grad[:, :16] if grad.shape[1] == 17 else grad)
        case.leaves[0].grad = None
    assert results["liger"][0] == pytest.approx(results["eager"][0], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(results["liger"][1], results["eager"][1], rtol=1e-4, atol=1e-6)
