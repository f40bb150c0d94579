#!/usr/bin/env bash
# The GPU benchmarks on a lent machine whose commands run at most 10 minutes and which goes back 30 s
# after a command ends: each call runs one whole slice, from a fresh install to its results in $OUT,
# so that nothing waits for a later call on the same machine.
#   bash load_tests/gpu_bench.sh batching [BENCH_BATCHING_ARGS ...]
#       make-tiny sd15-size (float16), then bench_batching.py with the arguments given; one run in
#       slices, one call each on the same machine: `--modes exact --variants eager,exact ...`, then
#       `--resume --modes compiled --variants eager,compiled ...` (one results.md over both)
#   bash load_tests/gpu_bench.sh starts MODE
#       `stepdiff serve --denoiser MODE` (and `--decoder compiled` for compiled) with the 512x512 warm-up,
#       timed to ready twice: first with the Inductor cache emptied, then again with it filled; the
#       stage models' warm-up lines (graphs, their memory, the decode's compile) from each start's log
#   bash load_tests/gpu_bench.sh compile [BENCH_COMPILE_ARGS ...]
#       make-tiny sd15-size (float16), then bench_compile.py (torch.compile levers of the compiled stages)
#   bash load_tests/gpu_bench.sh families BUILD:DTYPE [BUILD:DTYPE ...]
#       make-tiny BUILD, then bench_families.py, for each build
# Each slice stops its work STEPDIFF_CALL_SECONDS (default 560) after the call began and then copies what
# it has: $OUT/results.tgz (every file written, the logs too) and $OUT/run.log. It installs .gpu/ first
# when present (built here by ../shared/gpu/make-bundle.sh starlette uvicorn) and this checkout.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
began=$(date +%s)
deadline=$(( began + ${STEPDIFF_CALL_SECONDS:-560} ))
work=/tmp/gpu-bench
mkdir -p "$work/out"
left() {  # seconds until the deadline, at least 1 (`timeout 0` would mean no limit)
  local seconds=$(( deadline - $(date +%s) )); echo $(( seconds > 0 ? seconds : 1 ))
}
finish() {
  echo "gpu_bench: $slice ended after $(( $(date +%s) - began )) s"
  tar czf "$OUT/results.tgz" -C "$work" out run.log 2>/dev/null
  cp "$work/run.log" "$OUT/" 2>/dev/null
}
slice=$1; shift
trap finish EXIT
exec > >(tee "$work/run.log") 2>&1
if [ -d .gpu ]; then bash .gpu/install.sh > "$work/out/install.log" 2>&1 || { cat "$work/out/install.log"; exit 1; }; fi
python3 -m pip install -q --no-deps --no-build-isolation . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

sd15() { [ -d "$work/sd15" ] || python3 -m stepdiff make-tiny sd15-size "$work/sd15" --dtype float16 >/dev/null; }

since() { python3 -c "import time; print(round(time.time() - $1, 1))"; }  # seconds since a `date +%s.%N`

ready() { python3 -c "import urllib.request; urllib.request.urlopen('http://localhost:8000/v2/health/ready', timeout=2)" 2>/dev/null; }

timed_serve() {  # timed_serve NAME ARGS...: seconds to ready of `stepdiff serve ARGS`, then stopped again
  local name=$1; shift
  local start=$(date +%s.%N)
  setsid python3 -m stepdiff serve --pipeline "$work/sd15" --device cuda --dtype float16 "$@" \
    > "$work/out/serve-$name.log" 2>&1 < /dev/null &
  local server=$!
  local log=~/.cache/stepdiff/logs/tritonserver-8000.log
  until ready; do
    if ! kill -0 $server 2>/dev/null || [ "$(left)" -le 20 ]; then
      echo "$name: not ready after $(since $start) s (server exited or the call's time ran out)"
      cp "$log" "$work/out/tritonserver-$name.log"; kill -INT -$server 2>/dev/null; return 1
    fi
    sleep 1
  done
  echo "$name: ready in $(since $start) s"
  cp "$log" "$work/out/tritonserver-$name.log"
  grep -hoE '(denoise_step: denoiser|vae_decode: warm-up)[^"]*' "$log"
  kill -INT -$server; wait $server
}

case "$slice" in
  batching|compile)
    sd15
    timeout --signal=INT "$(left)" python3 "load_tests/bench_$slice.py" --pipeline "$work/sd15" \
      --out "$work/out" --device cuda --dtype float16 "$@"
    ;;
  starts)
    mode=$1
    decoder=$([ "$mode" = compiled ] && echo compiled || echo eager)
    sd15
    rm -rf "${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/stepdiff/inductor}"  # where stepdiff's compiles cache
    for start in cold warm; do  # recompiles named in the server's log: where a cold start's time goes
      TORCH_LOGS=recompiles timed_serve "$mode-$start" --denoiser "$mode" --decoder "$decoder" --warmup 512x512 || break
    done
    ;;
  families)
    for build in "$@"; do
      name=${build%%:*} dtype=${build##*:}
      python3 -m stepdiff make-tiny "$name" "$work/$name" --dtype "$dtype" >/dev/null
      timeout --signal=INT "$(left)" python3 load_tests/bench_families.py --pipeline "$work/$name" \
        --dtype "$dtype" --out "$work/out/families" || break
    done
    ;;
  *)
    echo "gpu_bench: unknown slice '$slice' (batching, compile, starts or families)"; exit 2 ;;
esac
