#!/usr/bin/env bash
# The whole GPU table in one go, for the device machines (torch 2.11, no install of ptp needed).
#   bash bench/gpu_suite.sh single   # one GPU: kernels, fast paths vs eager, latency, attention, throughput
#   bash bench/gpu_suite.sh pair     # two GPUs: tp=2 checks, latency at tp=2, all-reduce
# Logs and JSON lines go to $OUT (or ./out); bench/report.py turns them into tables and a plot.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/bench:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PTP_LOG_LEVEL=${PTP_LOG_LEVEL:-INFO}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ptp-inductor} PTP_CACHE_DIR=${PTP_CACHE_DIR:-/tmp/ptp-cache}
M8="--model llama-3.1-8b --load-format dummy --max-model-len 4096 --cuda-graph-max-bs 64"
step() { local name=$1 limit=$2; shift 2; [[ " ${SKIP:-} " == *" $name "* ]] && return; echo "=== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; echo "=== $name rc=$?"; }
case "${1:-single}" in
single)
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
  step kernels 120 python -m pytest tests/test_kernels.py -q -m gpu
  step latency_tp1 300 python bench/latency.py $M8 --batch-sizes 1,8 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step latency_tp1_eager 150 python bench/latency.py $M8 --batch-sizes 1 --input-len 128 --output-len 64 --torch-compile off --disable-cuda-graph --label eager --json "$OUT/latency.jsonl"
  step latency_b64 200 python bench/latency.py $M8 --batch-sizes 64 --input-len 384 --output-len 256 --label compiled-ctx512 --json "$OUT/latency.jsonl"
  step check_tp1 300 python bench/check_gpu.py --tp-list 1 --json "$OUT/check.jsonl"
  step attention 200 python bench/attention.py --json "$OUT/attention.jsonl"
  ;;
pair)
  step check_tp2 400 python bench/check_gpu.py --tp-list 1,2 --json "$OUT/check.jsonl"
  step allreduce 200 torchrun --nproc-per-node 2 bench/allreduce.py --check --json "$OUT/allreduce.jsonl"
  step latency_tp2 300 python bench/latency.py $M8 --tp 2 --batch-sizes 1,8,64 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step latency_tp2_nccl 300 python bench/latency.py $M8 --tp 2 --batch-sizes 1 --input-len 128 --output-len 256 --disable-custom-all-reduce --label nccl-only --json "$OUT/latency.jsonl"
  ;;
esac
