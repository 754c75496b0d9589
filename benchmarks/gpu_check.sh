#!/usr/bin/env bash
# The GPU check in one command (docs/gpu_check.md):
#
#   bash benchmarks/gpu_check.sh              # on a bare CUDA machine (torch, triton,
#                                             # transformers, peft preinstalled; no network)
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: every phase at tiny sizes, scratch CSVs
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh            # the same
#
# Phases, each under its own `timeout`, all inside GPU_CHECK_BUDGET_S (default 465 s < 8 min):
#   1 install      python -m pip install --no-deps --no-build-isolation -e .   (offline)
#   2 gpu-tests    python -m pytest -q -m gpu  on the test files holding gpu-marked tests
#                  (Triton kernels vs the reference on the device: every dtype and distribution,
#                  masks, n-sample updates, stochastic rounding, the noisy-linear kernel);
#                  skipped, with a message, when the image has no pytest
#   3 kernels      benchmarks/bench_kernels.py: triton vs MeZO's naive loop vs a copy (bandwidth)
#   4 step         benchmarks/bench_step.py --device cuda --dtype bf16 --model llama-1b
#                  (1.1B-parameter LLaMA from a config, random init): triton (in place),
#                  virtual (fused noisy linear), virtual-copy, mezo-ref, two forwards, one
#                  forward
#   5 noisy-linear benchmarks/bench_noisy_linear.py (when the file exists)
# then a summary. Results: rows appended to benchmarks/results/*.csv (the dry run writes to a
# scratch folder instead). With $OUT set, the CSVs and the log are copied into "$OUT".
#
# Environment: PYTHON (default python, else python3), GPU_CHECK_BUDGET_S, GPU_CHECK_DRY=1, OUT.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

DRY=${GPU_CHECK_DRY:-0}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^# Environment/p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done
[[ "$DRY" == "1" ]] || DRY=0

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
BUDGET=${GPU_CHECK_BUDGET_S:-465}
RESERVE=8                      # seconds kept for the summary and the copy to $OUT

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$WORK/gpu_check.log"
if [[ "$DRY" == 1 ]]; then
    RES="$WORK/results"        # the dry run never touches benchmarks/results
    mkdir -p "$RES"
else
    RES="$ROOT/benchmarks/results"
    unset TRITON_INTERPRET     # compiled kernels on the device, never the interpreter
fi

PHASES=()
STATUS=()
TIMES=()

log() { echo "$@" | tee -a "$LOG"; }

summary() {
    local i rc=0
    log ""
    log "== gpu_check summary ($( [[ $DRY == 1 ]] && echo "DRY RUN on CPU, tiny sizes" || echo "GPU" ), ${SECONDS}s of ${BUDGET}s budget) =="
    log "| phase | status | seconds |"
    log "| --- | --- | --- |"
    for i in "${!PHASES[@]}"; do
        log "| ${PHASES[$i]} | ${STATUS[$i]} | ${TIMES[$i]} |"
        case "${STATUS[$i]}" in ok|skipped*) ;; *) rc=1 ;; esac
    done
    if [[ -f "$WORK/step.log" ]]; then
        log ""
        log "bench_step.py table:"
        grep -E '^(\||[A-Za-z].*params)' "$WORK/step.log" | tee -a "$LOG" || true
    fi
    # the rows this run appended, one CSV per benchmark (what to merge and commit afterwards)
    "$PY" - "$RES" "$WORK" <<'PYEOF' 2>&1 | tee -a "$LOG" || true
import csv, json, sys
from pathlib import Path
res, work = Path(sys.argv[1]), Path(sys.argv[2])
before = json.loads((work / "rowcounts.json").read_text()) if (work / "rowcounts.json").exists() else {}
(work / "new_rows").mkdir(exist_ok=True)
for f in sorted(res.glob("*.csv")):
    with open(f, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows, fields = list(reader), reader.fieldnames or []
    new = rows[before.get(f.name, 0):]
    if new:
        with open(work / "new_rows" / f.name, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(new)
        print(f"new rows: {len(new):4d} in {f.name}")
PYEOF
    log ""
    log "results: $RES/*.csv (this run's rows alone: $WORK/new_rows/)   log: $LOG"
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT/new_rows"
        cp "$RES"/*.csv "$OUT"/ 2>/dev/null || true
        cp "$WORK"/new_rows/*.csv "$OUT"/new_rows/ 2>/dev/null || true
        log "copied the CSVs (all rows, and this run's in new_rows/) and the logs to $OUT"
        cp "$WORK"/*.log "$OUT"/ 2>/dev/null || true
    fi
    return $rc
}

finish() {
    local rc=$?
    trap - EXIT
    if summary; then exit "$rc"; else exit $(( rc ? rc : 1 )); fi
}
trap finish EXIT
trap 'exit 143' TERM INT

# run_phase NAME LIMIT_S CMD...: runs CMD under `timeout`, capped by what is left of the budget;
# output goes to the screen, the main log and $WORK/NAME.log. Never aborts the script.
run_phase() {
    local name=$1 limit=$2 left start rc
    shift 2
    left=$(( BUDGET - SECONDS - RESERVE ))
    (( limit < left )) || limit=$left
    PHASES+=("$name")
    if (( limit < 15 )); then
        STATUS+=("NOT RUN: out of time")
        TIMES+=(0)
        log "== $name: NOT RUN (out of time: ${limit}s left of the budget) =="
        return 0
    fi
    log ""
    log "== $name (timeout ${limit}s): $* =="
    start=$SECONDS
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    TIMES+=($(( SECONDS - start )))
    if (( rc == 0 )); then STATUS+=("ok")
    elif (( rc == 124 || rc == 137 )); then STATUS+=("TIMEOUT after ${limit}s")
    else STATUS+=("FAILED (exit $rc)")
    fi
    log "== $name: ${STATUS[-1]} in ${TIMES[-1]}s =="
}

# phase_limit N: N capped to what is left of the budget (what run_phase will allow)
phase_limit() {
    local left=$(( BUDGET - SECONDS - RESERVE ))
    if (( $1 < left )); then echo "$1"; else echo "$left"; fi
}

skip_phase() {
    PHASES+=("$1"); STATUS+=("skipped: $2"); TIMES+=(0)
    log ""
    log "== $1: skipped ($2) =="
}

# ---- environment ------------------------------------------------------------------------
"$PY" - "$RES" "$WORK" <<'PYEOF' || true
import csv, json, sys
from pathlib import Path
counts = {}
for f in Path(sys.argv[1]).glob("*.csv"):
    with open(f, newline="", encoding="utf-8") as fh:
        counts[f.name] = sum(1 for _ in csv.DictReader(fh))
(Path(sys.argv[2]) / "rowcounts.json").write_text(json.dumps(counts))
PYEOF
log "gpu_check.sh in $ROOT, $(date -u +%Y-%m-%dT%H:%M:%SZ), python: $(command -v "$PY" || echo "$PY")"
log "dry run: $DRY, budget ${BUDGET}s, results -> $RES"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG" || true
import importlib, platform
print("python", platform.python_version())
for mod in ("torch", "triton", "transformers", "peft", "pytest"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{mod}: not importable ({type(exc).__name__})")
try:
    import torch
    print("cuda available:", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception:
    pass
EOF

if [[ "$DRY" == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device visible to torch: this is the GPU check (use --dry-run on a CPU)"
    exit 2
fi

# ---- 1 install (offline; the dry run only resolves it) ----------------------------------
if [[ "$DRY" == 1 ]]; then
    run_phase install 60 "$PY" -m pip install --dry-run --no-deps --no-build-isolation -e .
else
    run_phase install 60 "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
if ! "$PY" -c "import zoengine" 2>>"$LOG"; then
    # e.g. an image whose setuptools cannot do PEP 660 editable installs offline: every module
    # lives under zoengine/, so the repository root on PYTHONPATH is the whole package
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    if "$PY" -c "import zoengine" 2>>"$LOG"; then
        log "WARNING: the install did not make zoengine importable; using the repository root on PYTHONPATH"
    else
        log "WARNING: zoengine does not import (install and shim both failed); the next phases will fail"
    fi
fi

# ---- 2 gpu-marked tests -----------------------------------------------------------------
mapfile -t GPU_TESTS < <(grep -l "mark\.gpu" tests/test_*.py 2>/dev/null || true)
if ! "$PY" -c "import pytest" 2>/dev/null; then
    skip_phase gpu-tests "pytest is not installed in this image; benchmarks still run"
elif (( ${#GPU_TESTS[@]} == 0 )); then
    skip_phase gpu-tests "no test file holds a gpu-marked test"
else
    # Without a GPU (the dry run) every gpu-marked test skips visibly: this checks the wiring.
    run_phase gpu-tests 110 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
        --continue-on-collection-errors "${GPU_TESTS[@]}"
    # pytest exit 5 = nothing collected / all deselected: not a failure of the kernels
    if [[ "${STATUS[-1]}" == "FAILED (exit 5)" ]]; then STATUS[-1]="skipped: no gpu test collected"; fi
fi

# ---- 3 kernel throughput ----------------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
    run_phase kernels 90 "$PY" benchmarks/bench_kernels.py --device cpu \
        --providers triton,native,naive,copy --sizes 1e4,1e5 --tensors 1,4 \
        --dtypes fp32,bf16 --dists normal,uniform --reps 2 --csv "$RES/bench_kernels.csv"
else
    run_phase kernels 90 "$PY" benchmarks/bench_kernels.py --device cuda \
        --providers triton,naive,copy --sizes 1e6,1e8,1e9 --tensors 1,256 \
        --dtypes fp32,bf16 --dists normal,uniform,rademacher --reps 5 \
        --csv "$RES/bench_kernels.csv"
fi

# ---- 4 full step on a >= 1B LLaMA in bf16 -----------------------------------------------
if [[ "$DRY" == 1 ]]; then
    # the GPU configurations on a tiny LLaMA, Triton in the interpreter on CPU tensors; the
    # fused virtual linear is left out (~30 s a step interpreted): the noisy-linear phase
    # smoke-runs that kernel
    run_phase step 200 "$PY" benchmarks/bench_step.py --device cpu --dtype bf16 \
        --model tiny-llama --backend triton \
        --configs forward1,inference,triton,virtual-copy,mezo-ref \
        --batch 2 --seq 16 --steps 1 --warmup 1 --timeout 60 \
        --total-timeout $(( $(phase_limit 200) - 15 )) \
        --csv "$RES/bench_step.csv"
else
    # baselines first: if time runs short, the configurations left out are the last ones
    run_phase step 170 "$PY" benchmarks/bench_step.py --device cuda --dtype bf16 \
        --model llama-1b \
        --configs forward1,inference,triton,virtual,virtual-copy,mezo-ref,lowrank-virtual,lowrank-batched \
        --batch 16 --seq 256 --steps 5 --warmup 2 --timeout 90 \
        --total-timeout $(( $(phase_limit 170) - 15 )) \
        --csv "$RES/bench_step.csv"
fi

# ---- 5 fused noisy linear (another helper's benchmark, when present) ---------------------
if [[ ! -f benchmarks/bench_noisy_linear.py ]]; then
    skip_phase noisy-linear "benchmarks/bench_noisy_linear.py does not exist"
elif [[ "$DRY" == 1 ]]; then
    if grep -q -- "--interpret-smoke" benchmarks/bench_noisy_linear.py; then
        run_phase noisy-linear 60 "$PY" benchmarks/bench_noisy_linear.py --interpret-smoke \
            --csv "$RES/bench_noisy_linear.csv"
    else
        skip_phase noisy-linear "no --interpret-smoke option: needs a GPU"
    fi
else
    run_phase noisy-linear 60 "$PY" benchmarks/bench_noisy_linear.py
fi
