#!/usr/bin/env bash
# Runs on the GPU machine, over what tools/device/build.sh packed into .device/ (carry it):
#
#   tools/device/run.sh tests    GPU kernel tests against the CPU, golden checks on the GPU
#   tools/device/run.sh split    golden checks on the GPU with the routed experts on the CPU
#   tools/device/run.sh serve    the demo on the GPU, tests/openai_client.py against serve
#   tools/device/run.sh score    V4-Flash-shaped synthetic layers scored on the GPU (compare
#                                with the CPU's run: tools/device/compare.py)
#   tools/device/run.sh bench ARGS...   hadal bench --device cuda ARGS (a report per call)
#   tools/device/run.sh ab N ARGS...   the same bench with this build and the one kept by
#                                tools/device/keep-prev.sh (.device/prev.tar.xz, carried too),
#                                alternating N times, each with its own kernel cache, into
#                                $OUT/ab.log (a "### new i" or "### prev i" line before each)
#   tools/device/run.sh cpu ARGS...   the CPU kernels' unit tests on this machine's CPU, then
#                                hadal bench --device cpu ARGS, the f32 kernels
#                                (HADAL_CPU_SIMD=avx512) and the default alternating, twice
#   tools/device/run.sh kernels NAME ARGS...   the same bench under Nsight Compute, steps run
#                                plainly (not replayed): each kernel's time, summed by name,
#                                in $OUT/NAME.txt (tools/device/kernels.py)
#   tools/device/run.sh timeline NAME ARGS...   the same bench with every kernel traced (start,
#                                end, stream; replayed steps included) by CUPTI
#                                (tools/device/ktrace.c) in $OUT/NAME.csv, summarised in $OUT/NAME.txt
#                                (tools/device/timeline.py: the last step's launches, gaps
#                                and overlap)
#   tools/device/run.sh probe    how fast one launch reads 32 MiB, cold, hot and after an L2
#                                prefetch (tools/device/l2probe.cu, built with the machine's
#                                nvcc), in $OUT/l2probe.txt
#   tools/device/run.sh pattern  how fast the one-token expert passes' access patterns read HBM
#                                without their arithmetic (tools/device/pattern.cu, built
#                                with the machine's nvcc), in $OUT/pattern.txt
#   tools/device/run.sh pdl      when a kernel launched to overlap the one before it starts,
#                                by the shapes of both, in streams and graphs (forks, joins:
#                                tools/device/pdlprobe.cu, built with the machine's nvcc), in
#                                $OUT/pdlprobe.txt
#   tools/device/run.sh profile NAME REGEX SKIP COUNT ARGS...   Nsight Compute's detailed
#                                sections (throughput, memory, occupancy, stall reasons) for
#                                COUNT launches of kernels matching REGEX after SKIP of them,
#                                in $OUT/NAME.txt; with SASS=1 also every instruction's
#                                executions and stall samples, $OUT/NAME.sass.csv (summarised
#                                by tools/device/sass.py)
#
# Several modes may follow each other in one call (separated by `--`). Logs and results go to
# $OUT; summary.txt says what ran, how it ended and how long it took.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/hadal-out}
mkdir -p "$OUT"
[ -x .device/bin/hadal ] || tar -C .device -xJf .device/bin.tar.xz || exit 1
B=$PWD/.device/bin
export HADAL_CACHE_DIR=/tmp/hadal-cache RUST_BACKTRACE=1
log() { echo "$@" | tee -a "$OUT/summary.txt"; }

# step NAME CMD...: runs CMD with its output appended to $OUT/NAME.log, notes status and time.
step() {
  local name=$1 start=$SECONDS rc
  shift
  echo "== $*" >> "$OUT/$name.log"
  "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  log "$name: $* -> exit $rc in $((SECONDS - start)) s"
  return $rc
}

serve_test() {
  "$B/hadal" demo --out /tmp/hadal-demo --device cuda --max-tokens 16 || return 1
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl || return 1
  export PYTHONPATH=/tmp/site
  local pids=() urls=() port
  for args in "--api-key test-key --max-running 8" "--max-running 1 --max-queue 1 --prefix-cache 0"; do
    port=$((8100 + ${#pids[@]}))
    # shellcheck disable=SC2086
    "$B/hadal" serve --model /tmp/hadal-demo --device cuda --port $port $args > "$OUT/server$port.txt" 2>&1 &
    pids+=($!)
    urls+=("http://127.0.0.1:$port")
  done
  for _ in $(seq 120); do
    grep -q "serving on" "$OUT"/server8100.txt "$OUT"/server8101.txt 2>/dev/null &&
      [ "$(grep -l "serving on" "$OUT"/server810?.txt | wc -l)" = 2 ] && break
    sleep 0.5
  done
  python3 tests/openai_client.py "${urls[0]}" "${urls[1]}" test-key
  local rc=$?
  kill "${pids[@]}" 2>/dev/null
  cat "$OUT"/server810?.txt && rm -f "$OUT"/server810?.txt
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem --format=csv >> "$OUT/summary.txt" 2>&1
mode=${1:-tests}
shift || true
while true; do
  case "$mode" in
    tests)
      step tests "$B/cuda_compile" --nocapture
      step tests "$B/cuda" --test-threads=1 --nocapture
      HADAL_DEVICE=cuda HADAL_GOLDEN_VERBOSE=1 HADAL_GOLDEN_DIR=$PWD/tests/fixtures/tiny-a step golden "$B/golden" --test-threads=1 --nocapture
      ;;
    split)
      # The golden checks with every routed expert in host memory, computed by the CPU.
      HADAL_DEVICE=cuda HADAL_EXPERTS_ON=cpu HADAL_GOLDEN_VERBOSE=1 HADAL_GOLDEN_DIR=$PWD/tests/fixtures/tiny-a \
        step split "$B/golden" --test-threads=1 --nocapture
      ;;
    serve)
      step serve serve_test
      ;;
    score)
      step score "$B/hadal" score --config tools/device/flash-csa-hca.config.json --device cuda \
        --tokens .device/tokens2500.safetensors --prefill 2496 --out "$OUT/gpu_logits.safetensors"
      ;;
    bench)
      args=()
      while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
      step bench "$B/hadal" bench --device cuda "${args[@]}"
      ;;
    ab)
      n=$1
      shift
      args=()
      while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
      [ -x .device/prev/hadal ] || tar -C .device -xJf .device/prev.tar.xz || exit 1
      for i in $(seq "$n"); do
        for which in new prev; do
          exe=$B/hadal cache=/tmp/hadal-cache
          [ $which = prev ] && exe=$PWD/.device/prev/hadal cache=/tmp/hadal-cache-prev
          echo "### $which $i" >> "$OUT/ab.log"
          HADAL_CACHE_DIR=$cache step ab "$exe" bench --device cuda "${args[@]}"
        done
      done
      ;;
    cpu)
      args=()
      while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
      step cpu lscpu
      step cpu "$B/unit" backend::cpu
      for simd in avx512 default avx512 default; do
        step cpu env HADAL_CPU_SIMD=$simd "$B/hadal" bench --device cpu "${args[@]}"
      done
      ;;
    kernels)
      name=$1
      shift
      args=()
      while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
      HADAL_CUDA_GRAPHS=0 step "$name" timeout 150 /usr/local/cuda/bin/ncu --clock-control none --csv --page raw \
        --metrics gpu__time_duration.sum --kernel-name-base function \
        --kernel-name 'regex:^(?!fill_random|copy_blocks)' -o /tmp/$name -f \
        "$B/hadal" bench --device cuda "${args[@]}"
      /usr/local/cuda/bin/ncu -i /tmp/$name.ncu-rep --csv --page raw --metrics gpu__time_duration.sum \
        > "/tmp/$name.csv" 2>> "$OUT/$name.log"
      python3 tools/device/kernels.py "/tmp/$name.csv" > "$OUT/$name.txt" 2>&1
      head -n 40 "$OUT/$name.txt"
      ;;
    timeline)
      name=$1
      shift
      args=()
      while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
      if [ ! -f /tmp/libktrace.so ]; then
        for v in 13 12 11 10 9; do
          gcc -O2 -shared -fPIC -DKVER=$v -I/usr/local/cuda/include tools/device/ktrace.c \
            -L/usr/local/cuda/lib64 -lcupti -o /tmp/libktrace.so 2>> "$OUT/$name.log" && break
        done
      fi
      if [ -f /tmp/libktrace.so ]; then
        LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} CUDA_INJECTION64_PATH=/tmp/libktrace.so \
          KTRACE_OUT="$OUT/$name.csv" step "$name" timeout 200 "$B/hadal" bench --device cuda "${args[@]}" &&
          python3 tools/device/timeline.py "$OUT/$name.csv" > "$OUT/$name.txt" 2>&1
        head -n 60 "$OUT/$name.txt"
      else
        log "$name: the tracer did not build (the compiler's messages are in $name.log)"
      fi
      ;;
    probe)
      step probe /usr/local/cuda/bin/nvcc -O3 -arch=sm_90a -o /tmp/l2probe tools/device/l2probe.cu &&
        step probe sh -c "/tmp/l2probe > $OUT/l2probe.txt"
      ;;
    pdl)
      step pdl /usr/local/cuda/bin/nvcc -O3 -arch=sm_90a -o /tmp/pdlprobe tools/device/pdlprobe.cu &&
        step pdl sh -c "/tmp/pdlprobe > $OUT/pdlprobe.txt"
      ;;
    pattern)
      step pattern /usr/local/cuda/bin/nvcc -O3 -arch=sm_90a -o /tmp/pattern tools/device/pattern.cu &&
        step pattern sh -c "/tmp/pattern > $OUT/pattern.txt"
      ;;
    profile)
      name=$1 regex=$2 skip=$3 count=$4
      shift 4
      args=()
      while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
      HADAL_CUDA_GRAPHS=0 step "$name" timeout 240 /usr/local/cuda/bin/ncu --clock-control none \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats --section LaunchStats --section InstructionStats \
        $([ "${SASS:-0}" = 1 ] && echo --section SourceCounters --section WarpStateStats) \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        --kernel-name-base function \
        --kernel-name "regex:$regex" --launch-skip "$skip" --launch-count "$count" \
        -o /tmp/$name -f "$B/hadal" bench --device cuda "${args[@]}"
      /usr/local/cuda/bin/ncu -i /tmp/$name.ncu-rep --page details > "$OUT/$name.txt" 2>> "$OUT/$name.log"
      # SASS=1: every instruction's executions and stall samples too (tools/device/sass.py).
      [ "${SASS:-0}" = 1 ] && /usr/local/cuda/bin/ncu -i /tmp/$name.ncu-rep --page source --csv \
        --print-source sass > "$OUT/$name.sass.csv" 2>> "$OUT/$name.log"
      ;;
    *) log "unknown mode $mode"; exit 2 ;;
  esac
  [ $# -gt 0 ] && [ "$1" = "--" ] && shift || break
  mode=$1
  shift
done
grep -hE "test result|panicked|FAILED|check [0-9]|skipped|error" "$OUT"/tests.log "$OUT"/golden.log "$OUT"/split.log 2>/dev/null | tail -n 60
tail -n 30 "$OUT"/bench.log "$OUT"/serve.log "$OUT"/score.log "$OUT"/cpu.log 2>/dev/null
[ -f "$OUT/ab.log" ] && grep -E '^###|^prefill|^ +[0-9]+K? +[0-9]+ ' "$OUT/ab.log"
