#!/usr/bin/env bash
# The GPU check of issue #34 in one run, for a lent GPU machine (an H200: torch 2.11, transformers 5.17,
# no network). Each step runs under its own `timeout` and writes its results under the results folder as
# it goes, so a step cut short costs only its own figures. Default time limits add up to 8 minutes.
#
#   bash benchmarks/gpu_check.sh [--quick] [--wheels DIR] [--out DIR]
#
# 0. env: installs every wheel under the wheels folder (default shared/wheels/; the transformers 5.24.0
#    wheel, transformers-5.24.0-py3-none-any.whl, and any dependency wheels it needs) with pip --no-index
#    --no-deps, then records the versions. No wheel: the image's transformers is used, and env.txt says so.
# 1. benchmarks/cuda_graph_replay.py: a decode step captured in a CUDA graph, replayed after a new prompt.
# 2. pytest tests/contracts/test_cuda.py and the CUDA test of tests/core/test_layer.py.
# 3. benchmarks/gpu_figures.py --steps ops,eager: eager figures, random-weight Qwen2.5-7B architecture.
# 4. benchmarks/gpu_figures.py --steps compile: compile time, unpatched vs SK-patched (inductor caches off).
# 5. benchmarks/gpu_figures.py --steps compiled: compiled (reduce-overhead) figures.
# 6. the compiled plan region: tests/core/test_compiled_plans.py's CUDA test and benchmarks/plan_kernels.py.
#
# --quick: a tiny architecture and short limits, to check the plumbing on any machine (CPU included).
# Results: --out DIR, else $OUT (set on the lent machine), else results-gpu-check/. summary.txt lists
# every step's exit status (124: its time limit) and wall time; env.log the versions used.
set -u

QUICK=0
WHEELS=shared/wheels
RESULTS="${OUT:-results-gpu-check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --out) RESULTS="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --quick, --wheels DIR, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
mkdir -p "$RESULTS" || exit 2
PY="${PYTHON:-python}"
# The tree is run from source: no install of vps needed on the lent machine.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "$QUICK" = 1 ]; then
  ARCH=(--tiny)
  T_ENV=60; T_REPLAY=120; T_TESTS=120; T_EAGER=240; T_COMPILE=300; T_COMPILED=300; T_PLANS=300
else
  ARCH=(--archs qwen2.5-7b)
  # 8 minutes in all: compile time (step 4) gets the most, the compiled figures what remains.
  T_ENV=30; T_REPLAY=45; T_TESTS=45; T_EAGER=105; T_COMPILE=120; T_COMPILED=75; T_PLANS=60
fi

SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"

# run NAME LIMIT COMMAND...: the command under `timeout`, its output in NAME.log, its status in summary.txt.
run() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit} s): $*" >> "$RESULTS/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$RESULTS/$name.log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (time limit)"
  echo "$name: exit $rc$note, $((SECONDS - start)) s" | tee -a "$SUMMARY"
  tail -n 25 "$RESULTS/$name.log"
  return 0
}

install_wheels() {
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels under $WHEELS: using the image's transformers"
  else
    "$PY" -m pip install --no-index --no-deps --force-reinstall "${wheels[@]}" || return 1
  fi
  "$PY" - <<'EOF'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)")
import vps  # the version floor check of the package itself runs here
print("vps", vps.__version__)
EOF
}

export -f install_wheels
export WHEELS PY
run env "$T_ENV" bash -c install_wheels
run cuda_graph_replay "$T_REPLAY" "$PY" benchmarks/cuda_graph_replay.py --out "$RESULTS/cuda_graph_replay.json"
run test_cuda "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/contracts/test_cuda.py \
    tests/core/test_layer.py::test_to_cuda_moves_gain_and_keeps_it_float32
run figures_eager "$T_EAGER" "$PY" benchmarks/gpu_figures.py "${ARCH[@]}" --steps ops,eager --out "$RESULTS/figures"
# A cold compile for each variant: no inductor cache from an earlier step or run shortens either.
run compile_time "$T_COMPILE" env TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 \
  "$PY" benchmarks/gpu_figures.py "${ARCH[@]}" --steps compile --compile-mode default --out "$RESULTS/figures"
run figures_compiled "$T_COMPILED" "$PY" benchmarks/gpu_figures.py "${ARCH[@]}" --steps compiled \
  --out "$RESULTS/figures"
# The opt-in compiled plan region (vps.compile_plans): its CUDA test (inductor), then kernels per patched layer
# and the prefill ratio at SmolLM2 shapes; the figures are in the step's log.
run compiled_plans "$T_PLANS" bash -c "\"$PY\" -m pytest -q -p no:cacheprovider tests/core/test_compiled_plans.py -k cuda \
  && \"$PY\" benchmarks/plan_kernels.py --device cuda --arch smollm2 --layers 4 --shape 8x512 --no-save"

echo "--- summary ($RESULTS) ---"
cat "$SUMMARY"
