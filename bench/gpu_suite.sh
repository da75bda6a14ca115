#!/usr/bin/env bash
# The whole GPU table in one go, for the device machines (torch 2.11, no install of ptp needed).
#   bash bench/gpu_suite.sh single   # one GPU: kernels, fast paths vs eager, latency, attention
#   bash bench/gpu_suite.sh pair-a   # two GPUs: all-reduce, latency at tp=1 and tp=2
#   bash bench/gpu_suite.sh pair-b   # two GPUs: greedy checks of every fast path, serving at tp=2
#   (perf, tp1-a, tp1-b, final-a, final-b, pair-check, pair-perf: the second session's calls;
#    final-c, attn, plain-mlp, prefill: the third session's; tp1-f, check-d, sweep-d, steps-d: the
#    fourth's; kern-e, check-e, perf-e, final-e, check-e2, graphs-e, graphs-e2, pad-e, warm-e: the fifth's;
#    many-check, many-perf: written in the sixth for 4 or 8 GPUs, not yet run; see the cases)
# Logs and JSON lines go to $OUT (or ./out); bench/report.py turns them into tables and a plot.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/bench:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PTP_LOG_LEVEL=${PTP_LOG_LEVEL:-INFO}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PTP_DEBUG_EXIT=${PTP_DEBUG_EXIT:-40}  # a process alive 40 s after its engine's shutdown prints its stacks
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ptp-inductor} PTP_CACHE_DIR=${PTP_CACHE_DIR:-/tmp/ptp-cache}
M8="--model llama-3.1-8b --load-format dummy --max-model-len 4096 --cuda-graph-max-bs 64"
step() { local name=$1 limit=$2; shift 2; [[ " ${SKIP:-} " == *" $name "* ]] && return; echo "=== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; echo "=== $name rc=$?"; }
litestar() {  # the server's web framework, from the wheels carried in .whl/ (../shared/GPU.md)
  [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
}
serving() {  # NAME LIMIT "ptp.serve flags" "bench/serving.py flags": serve the 8B config, load it, stop it
  step "$1" "$2" bash -c 'python -m ptp.serve $0 $1 --port 30000 > "$3/server.log" 2>&1 & pid=$!;
    for i in $(seq 1 200); do curl -sf localhost:30000/health >/dev/null && break; sleep 1; done;
    python bench/serving.py $2 --json "$3/serving.jsonl";
    kill -TERM $pid; wait $pid; echo "server exit status $?"; tail -3 "$3/server.log"' "${M8/llama-3.1-8b/bench/configs/llama-3.1-8b}" "$3" "$4" "$OUT"
}
case "${1:-single}" in
single)
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
  step kernels 120 python -m pytest tests/test_kernels.py -q -m gpu
  step latency_tp1 300 python bench/latency.py $M8 --batch-sizes 1,8 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step latency_tp1_eager 150 python bench/latency.py $M8 --batch-sizes 1 --input-len 128 --output-len 64 --torch-compile off --disable-cuda-graph --label eager --json "$OUT/latency.jsonl"
  step latency_b64 200 python bench/latency.py $M8 --batch-sizes 64 --input-len 384 --output-len 256 --label compiled-ctx512 --json "$OUT/latency.jsonl"
  step check_tp1 300 python bench/check_gpu.py --tp-list 1 --dtype float32 --json "$OUT/check.jsonl"
  step attention 200 python bench/attention.py --json "$OUT/attention.jsonl"
  ;;
perf)  # one GPU: where the batch-1 step's time goes, skinny GEMM against cuBLAS
  step kernels 200 python -m pytest tests/test_kernels.py -q -m gpu
  step gemm 200 python bench/gemm.py --rows 1,2,4 --json "$OUT/gemm.jsonl"
  step profile 300 python bench/profile_decode.py $M8 --cuda-graph-max-bs 8 --batch-sizes 1,8
  step profile_cublas 200 env PTP_DISABLE_SKINNY_GEMM=1 python bench/profile_decode.py $M8 --cuda-graph-max-bs 1 --batch-sizes 1
  ;;
tp1-a)  # one GPU: batch-1 latency against the eager baseline and without overlap
  step kernels 150 python -m pytest tests/test_kernels.py -q -m gpu
  step latency_tp1 200 python bench/latency.py $M8 --cuda-graph-max-bs 8 --batch-sizes 1,8 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step latency_tp1_sync 120 python bench/latency.py $M8 --cuda-graph-max-bs 8 --batch-sizes 1 --input-len 128 --output-len 256 --disable-overlap-schedule --label no-overlap --json "$OUT/latency.jsonl"
  step latency_tp1_eager 100 python bench/latency.py $M8 --batch-sizes 1 --input-len 128 --output-len 64 --torch-compile off --disable-cuda-graph --label eager --json "$OUT/latency.jsonl"
  ;;
tp1-b)  # one GPU: fast paths against eager in fp32, the step's kernels, tuned compile, batch 64
  step check_tp1 200 python bench/check_gpu.py --tp-list 1 --dtype float32 --json "$OUT/check.jsonl"
  step profile 100 python bench/profile_decode.py $M8 --cuda-graph-max-bs 1 --batch-sizes 1
  step latency_tp1_tuned 200 python bench/latency.py $M8 --cuda-graph-max-bs 8 --batch-sizes 1,8 --input-len 128 --output-len 256 --torch-compile tuned --label tuned --json "$OUT/latency.jsonl"
  ;;
final-a)  # one GPU: kernels, batch-1 latency from a cold and a warm cache, eager baseline
  rm -rf "$TORCHINDUCTOR_CACHE_DIR" "$PTP_CACHE_DIR" ~/.triton/cache
  step kernels 200 python -m pytest tests/test_kernels.py -q -m gpu
  rm -rf "$TORCHINDUCTOR_CACHE_DIR" "$PTP_CACHE_DIR" ~/.triton/cache
  step latency_tp1_cold 200 python bench/latency.py $M8 --batch-sizes 1,8 --input-len 128 --output-len 256 --label compiled-cold-cache --json "$OUT/latency.jsonl"
  step latency_tp1 150 python bench/latency.py $M8 --batch-sizes 1,8 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step latency_tp1_eager 100 python bench/latency.py $M8 --batch-sizes 1 --input-len 128 --output-len 64 --torch-compile off --disable-cuda-graph --label eager --json "$OUT/latency.jsonl"
  ;;
final-b)  # one GPU: fast paths against eager in fp32, batch 64, attention kernel alone, the step's kernels
  step check_tp1 300 python bench/check_gpu.py --tp-list 1 --dtype float32 --json "$OUT/check.jsonl"
  step latency_b64 150 python bench/latency.py $M8 --batch-sizes 64 --input-len 384 --output-len 256 --label compiled-ctx512 --json "$OUT/latency.jsonl"
  step profile 80 python bench/profile_decode.py $M8 --cuda-graph-max-bs 1 --batch-sizes 1
  ;;
final-c)  # one GPU (third session): batch-1 latency with and without PDL and the eager baseline in one call, the step's kernels
  step latency_tp1 150 python bench/latency.py $M8 --cuda-graph-max-bs 8 --batch-sizes 1,8 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step latency_tp1_nopdl 120 env PTP_DISABLE_PDL=1 python bench/latency.py $M8 --cuda-graph-max-bs 8 --batch-sizes 1 --input-len 128 --output-len 256 --label no-pdl --json "$OUT/latency.jsonl"
  step latency_tp1_eager 90 python bench/latency.py $M8 --batch-sizes 1 --input-len 128 --output-len 64 --torch-compile off --disable-cuda-graph --label eager --json "$OUT/latency.jsonl"
  step profile 100 python bench/profile_decode.py $M8 --cuda-graph-max-bs 1 --batch-sizes 1
  ;;
attn)  # one GPU (third session): decode kernel tests, attention per backend, batch 64 and batch 1 latency
  step kernels 200 python -m pytest tests/test_kernels.py -q -m gpu
  step attention 200 python bench/attention.py --json "$OUT/attention.jsonl"
  step latency_b64 150 python bench/latency.py $M8 --batch-sizes 64 --input-len 384 --output-len 256 --label compiled-ctx512 --json "$OUT/latency.jsonl"
  ;;
plain-mlp)  # one GPU (third session, its final state): kernels, projections, batch-1/8 latency, fp32 check
  step kernels 150 python -m pytest tests/test_kernels.py -q -m gpu
  step gemm 100 python bench/gemm.py --rows 1 --json "$OUT/gemm.jsonl"
  step latency_tp1 120 python bench/latency.py $M8 --cuda-graph-max-bs 8 --batch-sizes 1,8 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step check_tp1 330 python bench/check_gpu.py --tp-list 1 --dtype float32 --json "$OUT/check.jsonl"
  ;;
prefill)  # one GPU (third session): time to first token (prefill) per attention backend, 2k-token prompts
  for be in triton flex; do
    step prefill_$be 150 python bench/latency.py $M8 --cuda-graph-max-bs 8 --attention-backend $be --batch-sizes 1,8 --input-len 2048 --output-len 8 --label prefill-$be --json "$OUT/latency.jsonl"
  done
  ;;
tp1-f)  # one GPU (fourth session): kernels, batch 1 with A/B of two choices in one call (.ab/, not in git), eager, batch 64, attention
  step kernels 120 python -m pytest tests/test_kernels.py -q -m gpu
  L1="python bench/latency.py $M8 --cuda-graph-max-bs 8 --input-len 128 --output-len 256 --json $OUT/latency.jsonl"
  step latency_tp1 150 $L1 --batch-sizes 1,8 --label compiled
  for v in rms_norm_w16:kernels/rms_norm.py paged_attention_t64:kernels/paged_attention.py; do
    [ -f .ab/${v%%:*}.py ] || continue
    cp ${v#*:} /tmp/kept.py; cp .ab/${v%%:*}.py ${v#*:}
    step latency_tp1_${v%%:*} 90 $L1 --batch-sizes 1 --label ${v%%:*}
    cp /tmp/kept.py ${v#*:}
  done
  step latency_tp1_again 90 $L1 --batch-sizes 1 --label compiled
  step latency_tp1_eager 90 python bench/latency.py $M8 --batch-sizes 1 --input-len 128 --output-len 64 --torch-compile off --disable-cuda-graph --label eager --json "$OUT/latency.jsonl"
  step latency_b64 120 python bench/latency.py $M8 --batch-sizes 64 --input-len 384 --output-len 256 --label compiled-ctx512 --json "$OUT/latency.jsonl"
  step attention 120 python bench/attention.py --backends triton --json "$OUT/attention.jsonl"
  ;;
check-d)  # one GPU (fourth session): fast paths against eager in fp32, the step's kernels
  step check_tp1 400 python bench/check_gpu.py --tp-list 1 --dtype float32 --json "$OUT/check.jsonl"
  step profile 80 python bench/profile_decode.py $M8 --cuda-graph-max-bs 1 --batch-sizes 1
  ;;
sweep-d)  # one GPU (fourth session): decode tokens/s over batch sizes (the plot), offline throughput
  step latency_sweep 240 python bench/latency.py $M8 --cuda-graph-max-bs 128 --batch-sizes 1,2,4,8,16,32,64,128 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step throughput 200 python bench/throughput.py $M8 --cuda-graph-max-bs 256 --num-prompts 512 --input-len 512 --output-len 256 --json "$OUT/throughput.jsonl"
  ;;
steps-d)  # one GPU (fourth session): prefill and decode in separate steps (default) against --enable-mixed-chunk
  step check_mixed 200 python bench/check_gpu.py --tp-list 1 --dtype float32 --only "mixed" --json "$OUT/check.jsonl"
  T="python bench/throughput.py $M8 --cuda-graph-max-bs 256 --num-prompts 512 --input-len 512 --output-len 256 --json $OUT/throughput.jsonl"
  step throughput 150 $T --label separate-steps
  step throughput_mixed 150 $T --enable-mixed-chunk --label mixed-chunk
  litestar
  serving serving_tp1 200 "" "--request-rates 4,16,inf --num-prompts 128 --input-len 512 --output-len 128 --label tp1"
  ;;
kern-e)  # one GPU (fifth session): kernel tests, the decode kernel's merge in one launch against the previous kernel, batch 1, prefill eager vs compiled
  step kernels 150 python -m pytest tests/test_kernels.py -q -m gpu
  step attention_ab 150 python bench/attention_ab.py --previous .ab/paged_attention_prev.py
  L1="python bench/latency.py $M8 --cuda-graph-max-bs 8 --input-len 128 --output-len 256 --json $OUT/latency.jsonl"
  step latency_tp1 150 $L1 --batch-sizes 1,8 --label compiled
  cp kernels/paged_attention.py /tmp/kept.py; cp .ab/paged_attention_prev.py kernels/paged_attention.py
  step latency_tp1_prev 80 $L1 --batch-sizes 1 --label previous-kernel
  cp /tmp/kept.py kernels/paged_attention.py
  step latency_tp1_again 70 $L1 --batch-sizes 1 --label compiled
  step prefill 150 python bench/prefill.py $M8 --cuda-graph-max-bs 1 --input-lens 16,128,512,2048 --json "$OUT/prefill.jsonl"
  ;;
check-e)  # one GPU (fifth session): every fast path (compiled prefill included) against eager, fp32
  step check_tp1 560 python bench/check_gpu.py --tp-list 1 --dtype float32 --json "$OUT/check.jsonl"
  ;;
perf-e)  # one GPU (fifth session): compiled prefill in offline throughput and serving, batch 64, flex (eager steps) against eager
  litestar
  T="python bench/throughput.py $M8 --cuda-graph-max-bs 256 --num-prompts 512 --input-len 512 --output-len 256 --json $OUT/throughput.jsonl"
  step throughput 120 $T --torch-compile-prefill off --label eager-prefill
  step throughput_cp 150 $T --label compiled-prefill
  serving serving_cp 140 "" "--request-rates 16 --num-prompts 128 --input-len 512 --output-len 128 --label compiled-prefill"
  step latency_b64 100 python bench/latency.py $M8 --batch-sizes 64 --input-len 384 --output-len 256 --label compiled-ctx512 --json "$OUT/latency.jsonl"
  step check_flex 80 python bench/check_gpu.py --tp-list 1 --dtype float32 --only flex --json "$OUT/check.jsonl"
  ;;
check-e2)  # one GPU (fifth session): after the causal shortcut for whole prompts: fp32 check of every fast path, TTFT and its profile
  step check_tp1 400 python bench/check_gpu.py --tp-list 1 --dtype float32 --json "$OUT/check.jsonl"
  step prefill 120 python bench/prefill.py $M8 --cuda-graph-max-bs 1 --input-lens 16,128,512,2048 --repeat 3 --profile --json "$OUT/prefill.jsonl"
  ;;
graphs-e)  # one GPU (fifth session): one whole prompt through a CUDA graph per length bucket: fp32 check of the graphed variants, TTFT, batch 1, serving
  litestar
  step check_graphs 260 python bench/check_gpu.py --tp-list 1 --dtype float32 --only "compile + graphs,graphs (no compile)" --json "$OUT/check.jsonl"
  step prefill 110 python bench/prefill.py $M8 --cuda-graph-max-bs 1 --input-lens 16,128,512,2048 --repeat 3 --json "$OUT/prefill.jsonl"
  step latency_tp1 90 python bench/latency.py $M8 --cuda-graph-max-bs 8 --input-len 128 --output-len 256 --batch-sizes 1 --label prefill-graphs --json "$OUT/latency.jsonl"
  serving serving 100 "" "--request-rates 16 --num-prompts 128 --input-len 512 --output-len 128 --label prefill-graphs"
  ;;
graphs-e2)  # one GPU (fifth session): after the recompile fix of the prefill graphs' placeholder inputs: serving, batch 1, fp32 check
  litestar
  serving serving 110 "" "--request-rates 16 --num-prompts 128 --input-len 512 --output-len 128 --label prefill-graphs"
  step latency_tp1 90 python bench/latency.py $M8 --cuda-graph-max-bs 8 --input-len 128 --output-len 256 --batch-sizes 1,8 --label prefill-graphs --json "$OUT/latency.jsonl"
  step check_graphs 150 python bench/check_gpu.py --tp-list 1 --dtype float32 --only "compile + graphs, triton,graphs (no compile)" --json "$OUT/check.jsonl"
  ;;
pad-e)  # one GPU (fifth session): prefill shapes rounded up (cuDNN plans reused): serving TTFT p99, throughput, fp32 check of mixed steps
  litestar
  serving serving 110 "" "--request-rates 16 --num-prompts 128 --input-len 512 --output-len 128 --label padded-shapes"
  step throughput 150 python bench/throughput.py $M8 --cuda-graph-max-bs 256 --num-prompts 512 --input-len 512 --output-len 256 --label padded-shapes --json "$OUT/throughput.jsonl"
  step check_mixed 100 python bench/check_gpu.py --tp-list 1 --dtype float32 --only "mixed" --json "$OUT/check.jsonl"
  ;;
warm-e)  # one GPU (fifth session): the server's warm-up also runs a batched prefill: serving TTFT p99
  litestar
  serving serving 110 "" "--request-rates 16 --num-prompts 128 --input-len 512 --output-len 128 --label batched-warm-up"
  ;;
final-e)  # one GPU (fifth session, final code): start-up from an empty compile cache (prefill layer compiled too), batch 1, the attention table, serving with eager and compiled prefill
  rm -rf "$TORCHINDUCTOR_CACHE_DIR" "$PTP_CACHE_DIR"
  L1="python bench/latency.py $M8 --cuda-graph-max-bs 8 --input-len 128 --output-len 256 --json $OUT/latency.jsonl"
  step latency_cold 170 $L1 --batch-sizes 1,8 --label cold-cache
  step latency_warm 70 $L1 --batch-sizes 1 --label warm-cache
  step attention 90 python bench/attention.py --backends triton --json "$OUT/attention.jsonl"
  litestar
  S="--request-rates 16 --num-prompts 128 --input-len 512 --output-len 128"
  serving serving_ep 120 "--torch-compile-prefill off" "$S --label eager-prefill"
  serving serving_cp 120 "" "$S --label compiled-prefill"
  ;;
pair-check)  # two GPUs: every fast path at tp=2 against eager tp=1, fp32 (each variant starts two ranks)
  step check_tp2 560 python bench/check_gpu.py --tp-list 2 --dtype float32 --json "$OUT/check.jsonl"
  ;;
pair-perf)  # two GPUs: tp=2 latency with each rank's kernels (PTP_KERNEL_PROFILE), NCCL only, serving at tp=2
  litestar
  step latency_tp2 180 env PTP_PROFILE=1 PTP_KERNEL_PROFILE=50 python bench/latency.py $M8 --cuda-graph-max-bs 8 --tp 2 --batch-sizes 1,8 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step latency_tp2_nccl 90 python bench/latency.py $M8 --cuda-graph-max-bs 8 --tp 2 --batch-sizes 1 --input-len 128 --output-len 256 --disable-custom-all-reduce --label nccl-only --json "$OUT/latency.jsonl"
  serving serving_tp2 200 "--torch-compile off --tp 2" "--request-rates 4,16,inf --num-prompts 96 --input-len 512 --output-len 128 --label tp2"
  ;;
many-check)  # four or eight GPUs (the tp=4/8 issue): bf16 greedy tokens at every tp the GPUs allow against tp=1; all-reduce at N ranks
  N=$(nvidia-smi -L | wc -l); TPS=$(for t in 4 8; do [ "$t" -le "$N" ] && printf ",%s" $t; done)
  step check_many 400 python bench/check_gpu.py --tp-list 1$TPS --dtype bfloat16 --only "tp=4,tp=8" --json "$OUT/check.jsonl"
  step allreduce_$N 200 torchrun --nproc-per-node $N bench/allreduce.py --check --json "$OUT/allreduce.jsonl"
  ;;
many-perf)  # four or eight GPUs: batch 1 and 64 of the 8B shape at tp=1, 2, 4 (8), the 70B shape at tp=4 (8)
  N=$(nvidia-smi -L | wc -l)
  for t in 1 2 4 8; do [ "$t" -le "$N" ] && step latency_8b_tp$t 150 python bench/latency.py $M8 --tp $t --batch-sizes 1,64 --input-len 128 --output-len 256 --label 8b-tp$t --json "$OUT/latency.jsonl"; done
  for t in 4 8; do [ "$t" -le "$N" ] && step latency_70b_tp$t 280 python bench/latency.py ${M8/8b/70b} --tp $t --batch-sizes 1,64 --input-len 128 --output-len 256 --label 70b-tp$t --json "$OUT/latency.jsonl"; done
  ;;
pair-a)  # two GPUs, part one: all-reduce, latency at tp=1 and tp=2
  step allreduce 150 torchrun --nproc-per-node 2 bench/allreduce.py --check --json "$OUT/allreduce.jsonl"
  step latency_tp1 200 python bench/latency.py $M8 --batch-sizes 1,8 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step latency_tp2 200 env PTP_PROFILE=1 python bench/latency.py $M8 --tp 2 --batch-sizes 1,8,64 --input-len 128 --output-len 256 --label compiled --json "$OUT/latency.jsonl"
  step latency_tp2_nccl 150 python bench/latency.py $M8 --tp 2 --batch-sizes 1 --input-len 128 --output-len 256 --disable-custom-all-reduce --label nccl-only --json "$OUT/latency.jsonl"
  ;;
pair-b)  # two GPUs, part two: greedy checks of every fast path, serving at tp=2
  litestar
  step check_tp2 270 python bench/check_gpu.py --tp-list 1,2 --dtype float32 --json "$OUT/check.jsonl"
  serving serving_tp2 170 "--torch-compile off --tp 2" "--request-rates 2,8,32,inf --num-prompts 128 --input-len 512 --output-len 128 --label tp2"
  step latency_tp2_profile 100 env PTP_PROFILE=1 python -X faulthandler bench/latency.py $M8 --tp 2 --torch-compile off --batch-sizes 1 --input-len 128 --output-len 128 --repeat 1 --label graphs-no-compile --json "$OUT/latency.jsonl"
  ;;
prefix)  # one GPU: the prefix cache on and off, on a shared-prefix chat load and on random prompts (no hits)
  litestar
  SP="--request-rates inf --shared-prefix 64,8,2000 --input-len 64 --output-len 128"
  RP="--request-rates 16 --num-prompts 256 --input-len 512 --output-len 128"
  serving serving_prefix_on 400 "" "$SP --label prefix-cache-on"
  serving serving_prefix_off 500 "--disable-radix-cache" "$SP --label prefix-cache-off"
  serving serving_random_on 250 "" "$RP --label random-cache-on"
  serving serving_random_off 250 "--disable-radix-cache" "$RP --label random-cache-off"
  ;;
esac
