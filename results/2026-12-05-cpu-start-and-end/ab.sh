#!/usr/bin/env bash
# Old (36e08c8, unpacked into /work/main/ab-old with `git archive`) against new (this tree), alternated:
# a fresh `stepdiff serve` of tiny SD per run, 32 closed-loop clients on txt2img for 60 s after a 15 s ramp
# (closed_loop.py and serve_tiny.py of ../2026-12-05-cpu-bls-thread-pool/). Rounds 1-2 ran old first,
# rounds 3-4 new first.
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../2026-12-05-cpu-bls-thread-pool" || exit 1
for round in 1 2 3 4; do
  for tree in old new; do
    if [ $tree = old ]; then export PYTHONPATH=/work/main/ab-old/src; else unset PYTHONPATH; fi
    echo "{\"round\": $round, \"tree\": \"$tree\", \"result\": $(python closed_loop.py txt2img 32 60 15 18400 | tail -1)}" >> "$here/ab.jsonl"
  done
done
