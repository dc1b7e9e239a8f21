#!/usr/bin/env bash
# The accelerator benchmark behind the README's speed table: ViT-L and ViT-B pretraining
# steps in mae_jax and in the PyTorch yardstick, plus the mask-tokens-in-encoder baseline.
# Usage: OUT=results_dir [PYTHON=python3] bash benchmarks/gpu_bench.sh
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=.85
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
b=benchmarks/bench_train_step.py
run() { timeout 200 "$PYTHON" $b "$@" 2>>"$OUT/stderr.txt" | grep '^{' | tee -a "$OUT/results.jsonl"; }
# One framework per process: JAX preallocates most of the GPU's memory.
for a in "--model vit_l --batch 128" "--model vit_b --batch 256"; do
  run $a --dtype bfloat16 --steps 10
  run $a --dtype bfloat16 --steps 10 --torch --no_jax
done
run --model vit_l --batch 128 --dtype bfloat16 --steps 5 --mask_token_in_encoder
