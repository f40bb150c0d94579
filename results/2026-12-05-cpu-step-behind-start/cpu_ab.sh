#!/usr/bin/env bash
# CPU A/B: new (HEAD) vs old (orchestrator.py of HEAD~1), alternated twice.
cd /work/main
export HF_HUB_OFFLINE=1
run() {
  .venv/bin/python load_tests/bench_batching.py --pipeline /tmp/ab-sd --out /tmp/cpuab/$1 --device cpu --dtype float32 --size 64 --steps 30 --modes exact --variants eager --schedulers EulerDiscreteScheduler --concurrency 1,8 --ceiling-batches 8 --stage-batches 1 --duration 20 --repeats 3 --check-seeds 0 2>&1 | grep -E "identical|latency at|closed loop|open loop" | cut -c1-330 | sed "s/^/$1 /"
}
for round in 1 2; do
  git show HEAD~1:src/stepdiff/orchestrator.py > src/stepdiff/orchestrator.py; run old$round
  git checkout -q src/stepdiff/orchestrator.py; run new$round
done
git checkout -q src/stepdiff/orchestrator.py
