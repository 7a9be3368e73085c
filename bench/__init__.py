"""Benchmarks of grpo_kernels against eager PyTorch, torch.compile and Liger-Kernel.

One shared runner (:mod:`bench.runner`) and one script per op:

    python -m bench.loss --n 2048 --v 32000 --dtype bf16      # grpo_loss fwd / bwd / fwd+bwd
    python -m bench.logprobs --n 2048 --v 32000 --dtype fp32  # token_logprobs (+ entropy)
    python -m bench.train_step --n 2048 --v 32000             # tiny model: forward + loss + backward
    python -m bench.gpu                                       # the whole GPU suite, one command
    python -m bench.report --readme                           # results/*.md, the plot, README table

Every script compares, in one run, every backend in ``grpo_kernels.available_backends()`` for the
device, the eager reference (``backend="torch"``, TRL-style full log-softmax), ``torch.compile`` of that
reference, and Liger-Kernel where it runs; results go to ``bench/results/*.json`` and ``*.md``.
"""
