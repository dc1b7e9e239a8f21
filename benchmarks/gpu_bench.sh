#!/usr/bin/env bash
# The accelerator benchmark behind the README's speed table, one script for a lent GPU: ViT-B/L/H
# pretraining steps in mae_jax (bf16, a batch sweep for ViT-L) and in the PyTorch yardstick,
# plus the mask-tokens-in-encoder baseline. Every line lands in $OUT/results.jsonl.
# Usage: OUT=results_dir [PYTHON=python3] bash benchmarks/gpu_bench.sh
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=.85
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
b=benchmarks/bench_train_step.py
run() { timeout 300 "$PYTHON" $b --json "$OUT/results.jsonl" "$@" 2>>"$OUT/stderr.txt" | grep '^{'; }
# One framework per process: JAX preallocates most of the GPU's memory.
for batch in 64 128 256; do run --model vit_l --batch $batch --dtype bfloat16 --steps 10; done
run --model vit_b --batch 256 --dtype bfloat16 --steps 10
run --model vit_h --batch 64 --dtype bfloat16 --steps 10
for a in "--model vit_l --batch 128" "--model vit_b --batch 256" "--model vit_h --batch 64"; do
  run $a --dtype bfloat16 --steps 10 --torch --no_jax
done
run --model vit_l --batch 128 --dtype bfloat16 --steps 5 --mask_token_in_encoder
