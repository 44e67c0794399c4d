#!/usr/bin/env bash
# The whole Neural Procedural Memory loop on the default model and the shipped experiences:
# distil, list, retrieve for held-out instructions, generate without and with the memory, and
# analyse. Writes a transcript (every command and what it printed) and the analysis report with
# its plots to OUT (default docs/npm-demo); banks go to a temporary directory.
# Usage: bash tools/npm_demo.sh [OUT]   (after README.md's set-up: the model and a release build)
set -euo pipefail
cd "$(dirname "$0")/.."

E="${ENGRAM:-target/release/engram}"
OUT="${1:-docs/npm-demo}"
EXP=tests/fixtures/experiences_small.jsonl
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
[[ -x "$E" ]] || { echo "$E is missing: run cargo build --release first" >&2; exit 1; }
mkdir -p "$OUT/analysis"
TRANSCRIPT="$OUT/transcript.md"

# Runs a command, appending it and its stdout to the transcript (progress bars stay on stderr).
step() {
    local title="$1"
    shift
    echo "== $title" >&2
    {
        printf '### %s\n\n```console\n$' "$title"
        printf ' %q' "$@" | sed "s#$WORK/##g"
        printf '\n'
        "$@" 2>/dev/null | sed "s#$WORK/##g"
        printf '```\n\n'
    } >>"$TRANSCRIPT"
}

{
    echo "# Neural Procedural Memory on SmolLM2-135M-Instruct: one run"
    echo
    echo "Made by \`bash tools/npm_demo.sh\` on $(date -u +%Y-%m-%d) ($(nproc) CPU threads); experiences: \`$EXP\`."
    echo "Paths under a temporary directory are shown without it."
    echo
} >"$TRANSCRIPT"

step "Distil one memory per kind (auto layers: the 8 with the best held-out AUC)" \
    "$E" memory distill --experiences "$EXP" -o "$WORK/bank.safetensors"
step "List the bank" "$E" memory list "$WORK/bank.safetensors"
step "Show one memory" "$E" memory show "$WORK/bank.safetensors" cook
for task in "Fry an egg for breakfast." "Wipe the dirty kitchen counter." "Wash the muddy socks." "Give the garden roses some water."; do
    step "Retrieve for a held-out instruction: $task" "$E" memory retrieve "$WORK/bank.safetensors" --task "$task" --top-k 2
done
PROMPT="Fry an egg for breakfast. What do you do first?"
step "Generate without memory" "$E" generate --chat -p "$PROMPT" --max-tokens 48
step "Generate with memory, mode text (the workflow in the prompt)" "$E" generate --chat -p "$PROMPT" --max-tokens 48 \
    --memory "$WORK/bank.safetensors" --memory-mode text
# Mean-difference directions keep their raw norms (large at late layers), so the scale matters:
# show where the output is nudged and where it breaks.
for scale in 0.25 0.5 1; do
    step "Generate with memory, mode steer, scale $scale" "$E" generate --chat -p "$PROMPT" --max-tokens 48 \
        --memory "$WORK/bank.safetensors" --memory-mode steer --memory-scale "$scale"
done
step "Generate with memory, mode both, scale 0.5" "$E" generate --chat -p "$PROMPT" --max-tokens 48 \
    --memory "$WORK/bank.safetensors" --memory-mode both --memory-scale 0.5
step "Distil one memory per task (three per kind), on the same 15 layers, for within/across-kind analysis" \
    "$E" memory distill --experiences "$EXP" -o "$WORK/tasks.safetensors" --by task --layers 6-20
step "Analyse the per-task bank with the experiences, asking the model for labels" \
    "$E" memory analyze "$WORK/tasks.safetensors" --experiences "$EXP" -o "$OUT/analysis" --label
sed -i "s#$WORK/##g" "$OUT/analysis/report.md" "$OUT/analysis/report.json"
echo "wrote $TRANSCRIPT and $OUT/analysis/" >&2
