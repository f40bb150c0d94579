#!/usr/bin/env bash
# One soak leg on the lent GPU machine: $1 = leg name, $2 = duration, $3 = previous leg dir (optional).
set -u
export HF_HUB_OFFLINE=1
if ! python3 -c "import urllib.request; urllib.request.urlopen('http://localhost:8000/v2/health/ready', timeout=2)" 2>/dev/null; then
  [ -f /tmp/sd15/model_index.json ] || python3 -m stepdiff make-tiny sd15-size /tmp/sd15 --dtype float16 >/dev/null 2>&1
  setsid nohup python3 -m stepdiff serve --pipeline /tmp/sd15 --device cuda --dtype float16 > /tmp/serve.log 2>&1 < /dev/null &
  for i in $(seq 150); do python3 -c "import urllib.request; urllib.request.urlopen('http://localhost:8000/v2/health/ready', timeout=2)" 2>/dev/null && break; sleep 2; done
fi
previous=()
[ -n "${3:-}" ] && previous=(--previous "$3")
python3 load_tests/soak.py --url localhost:8000 --duration "$2" --users 8 --steps 10,20,30 \
  --sizes 512x512,384x384,512x384 --out /tmp/soak/$1 "${previous[@]}" > /tmp/soak-$1.log 2>&1
echo "soak exit $?" >> /tmp/soak-$1.log
cp /tmp/soak/$1/soak.md $OUT/$1.md; cp /tmp/soak/$1/soak.json $OUT/$1.json; tail -c 3000 /tmp/soak-$1.log > $OUT/$1.log
tail -c 4000 /tmp/serve.log > $OUT/serve-$1.log
tail -25 /tmp/soak/$1/soak.md
