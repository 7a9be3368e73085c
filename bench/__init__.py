"""Benchmarks of grpo_kernels against eager PyTorch, torch.compile and Liger-Kernel.

One small harness (:mod:`bench.harness`: environment record, timing, peak memory, fresh processes, result
files) used by every script, one runner for the op benchmarks (:mod:`bench.runner`) and one script per op:

    python -m bench.loss --n 2048 --v 32000 --dtype bf16      # grpo_loss fwd / bwd / fwd+bwd
    python -m bench.logprobs --n 2048 --v 32000 --dtype fp32  # token_logprobs (+ entropy)
    python -m bench.train_step --n 2048 --v 32000             # tiny model: forward + loss + backward
    python -m bench.latency                                   # 30 calls of the fused cpu loss, first / steady
    python -m bench.grpo_vs_ppo                               # one GRPO step against one PPO step
    python -m bench.trl_step                                  # stock TRL GRPOTrainer vs GRPOKernelsTrainer
    python -m bench.long_context                              # the same, completions of 1K .. 32K tokens
    python -m bench.gpu                                       # the whole GPU suite, one command
    python -m bench.report --readme                           # results/*.md, the plot, docs/benchmarks.md table

Every script compares, in one run, every backend in ``grpo_kernels.available_backends()`` for the
device (and its ``inplace=True`` form), TRL 1.16's own code (``trl``: what TRL users run), ``torch.compile``
of grpo_kernels' reference, Liger-Kernel where it runs, and the reference itself (``backend="torch"``, a
correctness tool); speed-ups are quoted against ``trl`` and ``compile``. Results go to
``bench/results/*.json`` and ``*.md``. Also: ``bench.latency`` (call-by-call latency of one fused loss in a
fresh process), ``bench.grpo_vs_ppo`` (one optimizer step of GRPO against PPO), ``bench/regenerate_cpu.sh``
(every CPU result file and the docs/benchmarks.md table, one command).
"""
