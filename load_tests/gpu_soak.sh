#!/usr/bin/env bash
# The GPU soak on a lent machine whose commands may run at most 10 minutes: one run of soak.py against
# one server, spread over several calls that follow each other before the machine goes idle.
#   bash load_tests/gpu_soak.sh start DURATION [COMMAND ...]
#       installs (.gpu/ and .gpu-load/wheels/, see README "Soak"), serves make-tiny sd15-size in float16
#       with every soak size's graphs captured at start (--warmup; --max-batch-size 8 bounds the row
#       buckets to what 8 users can fill), starts the load in the background, then runs COMMAND
#   bash load_tests/gpu_soak.sh wait SECONDS
#       waits up to SECONDS for the run to finish, copying the samples to $OUT every 30 s; exits 3 at
#       once on a machine without the run
# Each call copies the logs (tritonserver's last 200 kB too), the samples so far (samples.jsonl) and the
# report once written to $OUT: a machine taken away between calls still leaves the samples up to its last call.
set -u
export HF_HUB_OFFLINE=1
sizes=512x512,384x384,512x384
triton_log=~/.cache/stepdiff/logs/tritonserver-8000.log  # `stepdiff serve`'s default
ready() { python3 -c "import urllib.request; urllib.request.urlopen('http://localhost:8000/v2/health/ready', timeout=2)" 2>/dev/null; }
collect() {
  cp /tmp/soak-start.log "$OUT/" 2>/dev/null
  tail -c 20000 /tmp/soak.log > "$OUT/soak.log" 2>/dev/null
  tail -c 20000 /tmp/serve.log > "$OUT/serve.log" 2>/dev/null
  tail -c 200000 "$triton_log" > "$OUT/tritonserver.log" 2>/dev/null
  cp /tmp/soak/run/soak.md /tmp/soak/run/soak.json /tmp/soak/run/samples.jsonl "$OUT/" 2>/dev/null
  tail -3 /tmp/soak.log 2>/dev/null
}
if [ "$1" = start ]; then
  bash .gpu/install.sh >/dev/null 2>&1
  python3 -m pip install -q --no-index --no-deps --no-compile .gpu-load/wheels/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation .
  { python3 -c "import locust" && python3 -c "import stepdiff.cli"; } || { echo "gpu_soak: stepdiff or locust does not import"; exit 1; }
  python3 -m stepdiff make-tiny sd15-size /tmp/sd15 --dtype float16 >/dev/null 2>&1
  began=$(date +%s)
  setsid nohup python3 -m stepdiff serve --pipeline /tmp/sd15 --device cuda --dtype float16 --warmup $sizes \
    --max-batch-size 8 > /tmp/serve.log 2>&1 < /dev/null &
  server=$!
  until ready; do
    kill -0 $server 2>/dev/null || { echo "gpu_soak: the server exited"; tail -20 /tmp/serve.log; exit 1; }
    [ $(( $(date +%s) - began )) -gt 400 ] && { echo "gpu_soak: not ready after 400 s"; tail -20 /tmp/serve.log; exit 1; }
    sleep 2
  done
  echo "server ready after $(( $(date +%s) - began )) s" > /tmp/soak-start.log
  grep -hoE "(denoise_step: denoiser|vae_decode: warm-up).*" /tmp/serve.log "$triton_log" | head -4 >> /tmp/soak-start.log
  cat /tmp/soak-start.log
  setsid nohup python3 load_tests/soak.py --url localhost:8000 --duration "$2" --users 8 --steps 10,20,30 \
    --sizes $sizes --server-log "$triton_log" --out /tmp/soak/run > /tmp/soak.log 2>&1 < /dev/null &
  echo $! > /tmp/soak.pid
  shift 2
  "$@"
else
  # a fresh machine (the one that ran `start` went back) has no soak: say so at once, not after SECONDS
  [ -f /tmp/soak.pid ] || { echo "gpu_soak: no soak on this machine: the one that ran start went back"; exit 3; }
  deadline=$(( $(date +%s) + $2 ))
  polls=0
  while [ ! -f /tmp/soak/run/soak.md ] && [ "$(date +%s)" -lt "$deadline" ]; do
    kill -0 "$(cat /tmp/soak.pid)" 2>/dev/null || { [ -f /tmp/soak/run/soak.md ] || echo "gpu_soak: soak.py ended without its report"; break; }
    sleep 5
    # a call cut short by the session's device time still brings back the samples up to 30 s before
    polls=$(( polls + 1 )); [ $(( polls % 6 )) -eq 0 ] && collect >/dev/null
  done
fi
collect
