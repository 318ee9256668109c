#!/usr/bin/env bash
# The GPU checks in one command, for a short device session (see benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh [STEP ...]    STEP: memory throughput noise tune sweep seed
#                                              adaptive overhead (default: the first five, in that
#                                              order; seed = tune + the 30-epoch sweep + tune vs
#                                              reference in one process, seed_experiment.py;
#                                              adaptive = adaptive_vs_fixed.py; overhead =
#                                              adaptive_overhead.py)
#
# Runs the steps one after another, each under `timeout`, and puts everything in $OUT
# (./gpu-out when OUT is unset): gpu_check.log (all output), <step>.json for each step that
# finished, artifacts.tar.gz (each step's log, tune's run.json/report.html, the sweep's files).
# A step that fails or times out does not stop the next one. Exit status 0 when every step
# asked for finished, 1 when one failed, timed out or was skipped; 2 for an unknown step.
#
# Environment (all optional):
#   TOTAL_S=540     deadline of the whole script; each step's timeout is cut to what is left,
#                   and a step is skipped when fewer than MIN_STEP_S=45 seconds remain
#   MEMORY_S=330 THROUGHPUT_S=240 NOISE_S=330 TUNE_S=480 SWEEP_S=240   per-step caps
#   TUNE_EPOCHS=15 TUNE_BUDGET=120 TUNE_BF16=0 TUNE_ALSO_RULE=   tune_vs_reference.py's
#                   epochs, budget, --bf16, --also-lr-rule
#   SWEEP_EPOCHS=3 SWEEP_BATCHES=128,256,512,1024,2048,4096 SWEEP_TARGET=   the seed sweep
#   SEED_S=540 SEED_EPOCHS=30 SEED_BUDGET=20 SEED_BATCHES=128,512,1024,2048 SEED_BF16=1
#   ADAPTIVE_S=300 ADAPTIVE_EPOCHS=30 ADAPTIVE_BUDGET=30 ADAPTIVE_BF16=1 ADAPTIVE_REFERENCE=
#                   adaptive_vs_fixed.py's epochs, budget, --bf16, --reference-metric
#   OVERHEAD_S=180 OVERHEAD_STEPS=400 OVERHEAD_ROUNDS=5   adaptive_overhead.py (bf16 always)
#   PYTHON=python3  SMOKE=1 (every step in its --cpu-smoke form: checks the plumbing on a CPU)
# The sweep and seed steps need optuna: carried wheels in .whl/ (benchmarks/fetch_device_wheels.sh) are
# installed into /tmp/site when optuna is not importable; without them the step is skipped.
set -uo pipefail

ALL_STEPS=(memory throughput noise tune sweep seed adaptive overhead)
DEFAULT_STEPS=(memory throughput noise tune sweep)
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=("${DEFAULT_STEPS[@]}")
for step in "${STEPS[@]}"; do
    if [[ " ${ALL_STEPS[*]} " != *" $step "* ]]; then
        echo "error: unknown step '$step'; choose from: ${ALL_STEPS[*]}" >&2
        exit 2
    fi
done

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
mkdir -p "$WORK/logs"

PYTHON=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
DEADLINE=$(( $(date +%s) + ${TOTAL_S:-540} ))
MIN_STEP_S=${MIN_STEP_S:-45}
RESERVE_S=15  # left at the end for packing the artifacts
TUNE_EPOCHS=${TUNE_EPOCHS:-15}
TUNE_BUDGET=${TUNE_BUDGET:-120}
SWEEP_EPOCHS=${SWEEP_EPOCHS:-3}
SWEEP_BATCHES=${SWEEP_BATCHES:-128,256,512,1024,2048,4096}
TAIL_LINES=${TAIL_LINES:-24}

export PYTHONUNBUFFERED=1
export COLUMNS=${COLUMNS:-160}  # rich tables in the logs are not cut to 80 columns
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ -f "$ROOT/.data/cifar10-jpg.tar.xz" ]]; then
    export BATCHSCOPE_CIFAR10="$ROOT/.data/cifar10-jpg.tar.xz"
fi

declare -a DONE_NAMES=() DONE_STATUS=() DONE_SECONDS=()
FAILURES=0

note() { DONE_NAMES+=("$1"); DONE_STATUS+=("$2"); DONE_SECONDS+=("$3"); }

# run_step NAME CAP_SECONDS COMMAND...: COMMAND under timeout, output to the console and logs/.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$(( DEADLINE - $(date +%s) - RESERVE_S ))
    if (( left < MIN_STEP_S )); then
        echo "=== [$name] skipped: ${left}s left before the deadline (TOTAL_S)"
        note "$name" "skipped (deadline)" 0
        FAILURES=$((FAILURES + 1))
        return
    fi
    local limit=$(( cap < left ? cap : left ))
    echo
    echo "=== [$name] $(date +%T) timeout ${limit}s: $*"
    local started=$(date +%s)
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log"
    local rc=${PIPESTATUS[0]}
    local seconds=$(( $(date +%s) - started ))
    local status="ok"
    if (( rc == 124 || rc == 137 )); then
        status="timed out after ${limit}s"
    elif (( rc != 0 )); then
        status="failed (exit $rc)"
    fi
    [[ $status == ok ]] || FAILURES=$((FAILURES + 1))
    echo "=== [$name] $status in ${seconds}s"
    note "$name" "$status" "$seconds"
}

optuna_importable() { "$PYTHON" -c "import optuna" >/dev/null 2>&1; }

install_carried_wheels() {
    optuna_importable && return 0
    if ! compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        echo "optuna is not importable and no wheels are carried in .whl/"
        return 1
    fi
    echo "installing the carried wheels into /tmp/site: $(cd "$ROOT/.whl" && echo *.whl)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$ROOT"/.whl/*.whl || return 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    optuna_importable
}

step_memory() {
    local extra=()
    [[ $SMOKE == 1 ]] && extra=(--cpu-smoke --memory-budget 96MiB)
    run_step memory "${MEMORY_S:-330}" "$PYTHON" benchmarks/memory.py --out "$OUT/memory.json" \
        "${extra[@]}"
}

step_throughput() {
    local extra=()
    [[ $SMOKE == 1 ]] && extra=(--cpu-smoke)
    run_step throughput "${THROUGHPUT_S:-240}" "$PYTHON" benchmarks/throughput.py \
        --out "$OUT/throughput.json" "${extra[@]}"
}

step_noise() {
    local extra=()
    [[ $SMOKE == 1 ]] && extra=(--cpu-smoke)
    run_step noise "${NOISE_S:-330}" "$PYTHON" benchmarks/noise.py --out "$OUT/noise.json" \
        "${extra[@]}"
}

step_tune() {
    local extra=(--epochs "$TUNE_EPOCHS" --budget "$TUNE_BUDGET")
    [[ $SMOKE == 1 ]] && extra=(--cpu-smoke)
    [[ ${TUNE_BF16:-0} == 1 ]] && extra+=(--bf16)
    [[ -n ${TUNE_ALSO_RULE:-} ]] && extra+=(--also-lr-rule "$TUNE_ALSO_RULE")
    run_step tune "${TUNE_S:-480}" "$PYTHON" benchmarks/tune_vs_reference.py \
        --out "$OUT/tune_vs_reference.json" --tune-out "$WORK/tune" "${extra[@]}"
}

step_adaptive() {
    local extra=(--epochs "${ADAPTIVE_EPOCHS:-30}" --budget "${ADAPTIVE_BUDGET:-30}")
    [[ $SMOKE == 1 ]] && extra=(--cpu-smoke)
    [[ ${ADAPTIVE_BF16:-1} == 1 && $SMOKE != 1 ]] && extra+=(--bf16)
    [[ -n ${ADAPTIVE_REFERENCE:-} && $SMOKE != 1 ]] && extra+=(--reference-metric "$ADAPTIVE_REFERENCE")
    run_step adaptive "${ADAPTIVE_S:-300}" "$PYTHON" benchmarks/adaptive_vs_fixed.py \
        --out "$OUT/adaptive_vs_fixed.json" --tune-out "$WORK/adaptive-tune" \
        --adaptive-out "$WORK/adaptive-run" "${extra[@]}"
}

step_overhead() {
    local extra=(--bf16 --steps "${OVERHEAD_STEPS:-400}" --rounds "${OVERHEAD_ROUNDS:-5}")
    [[ $SMOKE == 1 ]] && extra=(--cpu-smoke)
    run_step overhead "${OVERHEAD_S:-180}" "$PYTHON" benchmarks/adaptive_overhead.py \
        --out "$OUT/adaptive_overhead.json" "${extra[@]}"
}

# needs_optuna STEP: true when optuna imports (carried wheels installed if needed); otherwise
# notes STEP as skipped and returns false.
needs_optuna() {
    [[ $SMOKE == 1 ]] && return 0
    install_carried_wheels && return 0
    echo "=== [$1] skipped: optuna is not importable (run benchmarks/fetch_device_wheels.sh here and carry .whl)"
    note "$1" "skipped (no optuna)" 0
    FAILURES=$((FAILURES + 1))
    return 1
}

step_sweep() {
    needs_optuna sweep || return 0
    local args=(-w resnet18-cifar10 -b "$SWEEP_BATCHES" --epochs "$SWEEP_EPOCHS" --device cuda)
    [[ $SMOKE == 1 ]] && args=(-w small-cnn-cifar10 -o train_size=1024 -o test_size=256
                               -b 32,64,128 --epochs 1 --device cpu)
    [[ -n ${SWEEP_TARGET:-} ]] && args+=(--target-metric "$SWEEP_TARGET")
    [[ -f "$WORK/tune/run.json" ]] && args+=(--predicted "$WORK/tune/run.json")
    run_step sweep "${SWEEP_S:-240}" "$PYTHON" -m batchscope sweep "${args[@]}" \
        --lr-rule linear --out "$WORK/sweep"
    [[ -f "$WORK/sweep/run.json" ]] && cp "$WORK/sweep/run.json" "$OUT/sweep.json"
}

step_seed() {
    needs_optuna seed || return 0
    local args=(--epochs "${SEED_EPOCHS:-30}" --budget "${SEED_BUDGET:-20}"
                --batch-sizes "${SEED_BATCHES:-128,512,1024,2048}")
    [[ ${SEED_BF16:-1} == 1 ]] && args+=(--bf16)
    [[ $SMOKE == 1 ]] && args=(--cpu-smoke --batch-sizes 32,64)
    # The work folder (tune and sweep records, reports, figures, Optuna journal) lives in $OUT,
    # so that a run cut short still brings back whatever it wrote; a fresh one per run, since
    # seed_experiment.py refuses to resume an older sweep.
    run_step seed "${SEED_S:-540}" "$PYTHON" benchmarks/seed_experiment.py \
        --out "$OUT/seed.json" --work "$OUT/seed-$(date +%Y%m%d-%H%M%S)" "${args[@]}"
    return 0
}

header() {
    echo "gpu_check: steps ${STEPS[*]}; deadline in ${TOTAL_S:-540}s; smoke=$SMOKE; out $OUT"
    echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "BATCHSCOPE_CIFAR10=${BATCHSCOPE_CIFAR10:-unset}"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    if [[ -z ${BATCHSCOPE_CIFAR10:-} && ! -f "$ROOT/../shared/data/cifar10-jpg.tar.xz" ]]; then
        echo "warning: no CIFAR-10 archive at .data/cifar10-jpg.tar.xz; copy it there and carry .data"
    fi
}

summary() {
    echo
    echo "=== summary (logs: artifacts.tar.gz; full output: gpu_check.log) ==="
    local i
    for i in "${!DONE_NAMES[@]}"; do
        printf '%-11s %-28s %5ss\n' "${DONE_NAMES[$i]}" "${DONE_STATUS[$i]}" "${DONE_SECONDS[$i]}"
    done
    for i in "${!DONE_NAMES[@]}"; do
        local log="$WORK/logs/${DONE_NAMES[$i]}.log"
        [[ -f $log ]] || continue
        echo
        echo "--- ${DONE_NAMES[$i]}: last $TAIL_LINES lines ---"
        tail -n "$TAIL_LINES" "$log"
    done
    tar -czf "$OUT/artifacts.tar.gz" -C "$WORK" . && echo "packed: $OUT/artifacts.tar.gz"
    ls -l "$OUT"
}

main() {
    header
    local step
    for step in "${STEPS[@]}"; do
        "step_$step"
    done
    summary
    [[ ${KEEP_WORK:-0} == 1 ]] || rm -rf "$WORK"
    (( FAILURES == 0 ))
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
