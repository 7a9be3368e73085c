#!/usr/bin/env bash
# Every CPU result file in bench/results, then the Markdown, the plot and the table of docs/benchmarks.md, in one command.
# Run it on a quiet machine (other processes show up as noise; each result file records the load it saw).
# Expected runtime on the project's 2-core CPU machine, idle: about 25 minutes (most of it the torch.compile
# and reference rows and the fresh process per row that measures peak memory).
#
#     bash bench/regenerate_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
for dtype in fp32 bf16; do
    python -m bench.loss --device cpu --n 2048 --v 32000 --dtype "$dtype"
    python -m bench.logprobs --device cpu --n 2048 --v 32000 --dtype "$dtype"
    python -m bench.train_step --device cpu --n 2048 --v 32000 --dtype "$dtype"
done
python -m bench.latency --calls 30 --n 2048 --v 32000 --dtype fp32 --out bench/results
python -m bench.grpo_vs_ppo --device cpu
python -m bench.report --readme
echo "bench/regenerate_cpu.sh: done in $((SECONDS - start)) s"
