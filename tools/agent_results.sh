#!/usr/bin/env bash
# The commands behind docs/agent-results.md: TextWorldExpress (coin, sorting) on the default model.
# Run from the repository root after `bash tools/envs/setup.sh`; outputs go to $D (default /tmp/agent).
set -euo pipefail
E=${E:-target/release/engram}
D=${D:-/tmp/agent}
mkdir -p "$D"
if [ "${SKIP_BANK:-0}" != 1 ]; then
  # train experiences: expert with probability 0.3 of a random valid action at each step
  for g in coin sorting; do
    nice -n 5 $E agent collect --env twx:$g --split train --episodes 30 --policy mixed --deviation 0.3 -o "$D/twx_train.jsonl"
  done
  /usr/bin/time -f "%e s wall" nice -n 5 $E memory distill --experiences "$D/twx_train.jsonl" -o "$D/twx_bank.safetensors"
  $E memory list "$D/twx_bank.safetensors"
  # dev baseline (no memory), 8 episodes per game, 15 steps
  for g in coin sorting; do
    /usr/bin/time -f "%e s wall" nice -n 5 $E agent eval --env twx:$g --split dev --episodes 8 --conditions none --max-steps 15 \
      --json "$D/dev_${g}_none.json" --markdown "$D/dev_${g}_none.md"
  done
fi
# dev sweep of the steering scale: 4 coin episodes, 10 steps (time allowed no more)
for s in 0.5 1; do
  for g in coin; do
    /usr/bin/time -f "%e s wall" nice -n 5 $E agent eval --env twx:$g --split dev --episodes 4 --conditions steer --max-steps 10 \
      --memory "$D/twx_bank.safetensors" --memory-scale $s --json "$D/dev_${g}_steer_$s.json" --markdown "$D/dev_${g}_steer_$s.md"
  done
done
# best scale: dev successes, ties by mean score, then the smaller scale
S=$(python3 - "$D" <<'PY'
import json, sys
d = sys.argv[1]
best = None
for s in ["0.5", "1"]:
    rs = [r for g in ("coin",) for r in json.load(open(f"{d}/dev_{g}_steer_{s}.json"))["results"]]
    key = (sum(r["success"] for r in rs), sum(r["score"] for r in rs) / len(rs), -float(s))
    if best is None or key > best[0]:
        best = (key, s)
print(best[1])
PY
)
echo "chosen scale: $S"
# test: the four conditions on the same episodes
for g in coin sorting; do
  if [ $g = coin ]; then M=8; else M=4; fi
  /usr/bin/time -f "%e s wall" nice -n 5 $E agent eval --env twx:$g --split test --episodes $M --conditions none,text,steer,both --max-steps 10 \
    --memory "$D/twx_bank.safetensors" --memory-scale $S --json "$D/test_$g.json" --markdown "$D/test_$g.md"
done
