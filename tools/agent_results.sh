#!/usr/bin/env bash
# The commands behind docs/agent-results.md: TextWorldExpress (coin, sorting) and ScienceWorld
# (three tasks, easy mode) on the default model, four memory conditions, the steering settings
# chosen on dev and reported on test. Run from the repository root after `bash tools/envs/setup.sh`
# and a release build. The two benchmarks run side by side, one engram thread each (2 cores).
#   D=/tmp/agent E=target/release/engram bash tools/agent_results.sh          # everything
#   ONLY=twx|sw ... SKIP_BANK=1 ...                                           # parts
# Sizes (episodes, steps) are variables so a faster machine can run more: see the defaults below.
set -euo pipefail
E=${E:-target/release/engram}
D=${D:-/tmp/agent}
THREADS=${THREADS:-1}
MODEL_OPTS=(--dtype native --threads "$THREADS")
mkdir -p "$D"

# the steering settings of the dev sweep: scale, then layers ("all" = the memory's own layers)
SCALES=${SCALES:-"0.5 1 2 4"}
LAYER_RANGES=${LAYER_RANGES:-"0-14 15-29"}

t() { /usr/bin/time -f "%e s wall: $*" nice -n 5 "$@"; }

# the best setting: most dev successes, then mean dev score, then the earlier setting; each
# argument is one setting's dev JSON files joined by commas (one per environment)
choose() {
  python3 - "$@" <<'PY'
import json, sys
best = None
for i, group in enumerate(sys.argv[1:]):
    rs = [r for path in group.split(",") for r in json.load(open(path))["results"]]
    key = (sum(r["success"] for r in rs), sum(r["score"] for r in rs) / max(len(rs), 1), -i)
    if best is None or key > best[0]:
        best = (key, i)
print(best[1])
PY
}

# pipeline NAME "ENV[=TASKS] ..." TRAIN_EPISODES DEV_EPISODES TEST_EPISODES MAX_STEPS TRAIN_MAX_STEPS
#   one bank from every environment's train episodes; dev and test run per environment
pipeline() {
  local name=$1 envs=$2 ntrain=$3 ndev=$4 ntest=$5 steps=$6 train_steps=$7
  local bank="$D/${name}_bank.safetensors" spec env tasks
  if [ "${SKIP_BANK:-0}" != 1 ]; then
    # train experiences: the expert with probability 0.3 of a random valid action at each step
    for spec in $envs; do
      env=${spec%%=*}; tasks=${spec#*=}; [ "$tasks" = "$spec" ] && tasks=""
      # each task on its own, so every task gets ntrain episodes
      for task in ${tasks//,/ }; do
        t $E agent collect --env "$env" --tasks "$task" --split train --episodes "$ntrain" --policy mixed --deviation 0.3 \
          --max-steps "$train_steps" -o "$D/${name}_train.jsonl"
      done
      # tasks whose mixed episodes at 0.3 all failed get more episodes at a smaller deviation
      # (TASK:EPISODES:DEVIATION; collect resumes, so only the new variations run)
      for more in ${MORE_TRAIN:-}; do
        IFS=: read -r task n dev <<<"$more"
        t $E agent collect --env "$env" --tasks "$task" --split train --episodes "$n" --policy mixed --deviation "$dev" \
          --max-steps "$train_steps" -o "$D/${name}_train.jsonl"
      done
      if [ -z "$tasks" ]; then
        t $E agent collect --env "$env" --split train --episodes "$ntrain" --policy mixed --deviation 0.3 \
          --max-steps "$train_steps" -o "$D/${name}_train.jsonl"
      fi
    done
    t $E memory distill "${MODEL_OPTS[@]}" --experiences "$D/${name}_train.jsonl" -o "$bank"
  fi
  $E memory list "$bank"
  # eval SPLIT EPISODES LABEL CONDITIONS [memory options]: one run per environment; prints the JSON files
  eval_all() {
    local split=$1 n=$2 label=$3 conditions=$4; shift 4
    local files=() out
    for spec in $envs; do
      env=${spec%%=*}; tasks=${spec#*=}; [ "$tasks" = "$spec" ] && tasks=""
      out="$D/${name}_${split}_${label}_${env//[:\/]/-}"
      t $E agent eval --env "$env" ${tasks:+--tasks "$tasks"} --split "$split" --episodes "$n" --max-steps "$steps" \
        "${MODEL_OPTS[@]}" ${EVAL_OPTS:-} --conditions "$conditions" "$@" --json "$out.json" --markdown "$out.md" >&2
      files+=("$out.json")
    done
    local IFS=,; echo "${files[*]}"
  }
  # dev: the baseline, then steering at each scale on the memory's own layers, then the best
  # scale on the first and on the second half of the network only
  eval_all dev "$ndev" none none >/dev/null
  local groups=() settings=() s r i
  for s in $SCALES; do
    groups+=("$(eval_all dev "$ndev" "steer-s$s" steer --memory "$bank" --memory-scale "$s")")
    settings+=("$s all")
  done
  i=$(choose "${groups[@]}")
  local best_scale=${settings[$i]%% *}
  for r in $LAYER_RANGES; do
    groups+=("$(eval_all dev "$ndev" "steer-s$best_scale-l$r" steer --memory "$bank" --memory-scale "$best_scale" --memory-layers "$r")")
    settings+=("$best_scale $r")
  done
  i=$(choose "${groups[@]}")
  local scale=${settings[$i]%% *} layers=${settings[$i]#* }
  echo "$name: chosen on dev: scale $scale, layers $layers" | tee "$D/${name}_chosen.txt"
  local layer_opt=()
  if [ "$layers" != all ]; then layer_opt=(--memory-layers "$layers"); fi
  # test: the four conditions on the same episodes with the chosen setting
  eval_all test "$ntest" four none,text,steer,both --memory "$bank" --memory-scale "$scale" "${layer_opt[@]}" >/dev/null
}

SW_TASKS=${SW_TASKS:-lifespan-longest-lived,find-living-thing,find-plant}
case "${ONLY:-both}" in
  twx) pipeline twx "twx:coin twx:sorting" "${TWX_TRAIN:-30}" "${TWX_DEV:-6}" "${TWX_TEST:-12}" 10 30 ;;
  # ScienceWorld prompts with the workflow text reach ~1,030 tokens: 2,048 KV positions
  sw) MORE_TRAIN=${MORE_TRAIN-find-plant:16:0.15} EVAL_OPTS=${EVAL_OPTS---context 2048} pipeline sw "scienceworld=$SW_TASKS" "${SW_TRAIN:-8}" "${SW_DEV:-6}" "${SW_TEST:-12}" 10 25 ;;
  both)
    ONLY=twx bash "$0" >"$D/twx.log" 2>&1 &
    ONLY=sw bash "$0" >"$D/sw.log" 2>&1 &
    wait ;;
esac
