#!/usr/bin/env bash
# Every CUDA path of fedgov on one GPU, in under 8 minutes:
#   1. the default simulation with runtime.device = "cuda" on the pool engine (one worker per
#      core, all sharing the GPU; started by forkserver, as CUDA cannot be forked), and on
#      Flower's engine with four clients sharing the GPU (runtime.client_gpu_fraction = 0.25);
#   2. DP-SGD (Opacus) training on CUDA inside the simulation (pool engine);
#   3. `python -m fedgov.bench --device cuda` for the suites that use the device:
#      dp_training (the full suite's widths up to 1024, one epoch, CUDA beside the CPU),
#      round and realtime at quick sizes.
# Eight files go under $OUT (the device tool's folder) or, without it, under
# benchmarks/results/<gpu>-<date>/. Usage: bash benchmarks/gpu_check.sh [results-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of this script on a machine without a GPU
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: PyTorch sees no CUDA device here ($("$PYTHON" -c 'import torch; print(torch.__version__)'))" >&2
  exit 2
fi
"$PYTHON" -c "import fedgov" 2>/dev/null || "$PYTHON" -m pip install --quiet --no-deps -e .

gpu=$("$PYTHON" -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-') if torch.cuda.is_available() else 'no-gpu')")
results=${1:-${OUT:-benchmarks/results/${gpu}-$(date -u +%Y%m%d)}}
mkdir -p "$results"
runs=$(mktemp -d)
log="$results/gpu_check.log"
echo "gpu_check: $gpu; results in $results" | tee "$log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true; } | tee -a "$log"

check_run() {  # a run dir: trained on CUDA, every round by every sampled cooperative, no failure
  "$PYTHON" - "$1" "$2" "$DEVICE" <<'EOF' | tee -a "$log"
import json, sys
from pathlib import Path
run, name, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
summary = json.loads((run / "summary.json").read_text())
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
failures = [f for r in rows for f in r.get("failures", [])]
assert summary["device"].startswith(device), f"{name}: trained on {summary['device']}, not {device}"
assert rows and not failures, f"{name}: failures {failures[:3]}"
assert all(r["participants"] == len(r["sampled"]) for r in rows), f"{name}: a cooperative did not take part"
print(f"{name}: {len(rows)} rounds on {summary['device']}, final accuracy {summary['final_accuracy']:.4f}, "
      f"{summary['wall_seconds']:.1f} s wall, max epsilon {(summary.get('privacy') or {}).get('max_epsilon', '-')}")
EOF
}

simulate() {  # name, then --set overrides
  local name=$1; shift
  local started=$SECONDS
  "$PYTHON" -m fedgov.simulate --no-progress --out "$runs/$name" --set runtime.device="$DEVICE" "$@" \
    > "$runs/$name.out" 2> "$runs/$name.err" || { tail -5 "$runs/$name.err" | tee -a "$log"; exit 1; }
  local run_dir
  run_dir=$(tail -1 "$runs/$name.out")
  check_run "$run_dir" "$name"
  cp "$run_dir/summary.json" "$results/$name.summary.json"
  echo "$name: $((SECONDS - started)) s" | tee -a "$log"
}

# 1. Default task on CUDA: 10 cooperatives on the pool's workers, then on Flower's engine four per GPU at a time.
simulate "simulate_pool_$DEVICE"
simulate "simulate_flower_$DEVICE" --set runtime.engine=flower --set runtime.client_gpu_fraction=0.25
# 2. DP-SGD on CUDA (fixed noise: this times the path, it spends no budget).
simulate "dp_sgd_$DEVICE" --set privacy.dp=sample --set privacy.noise_multiplier=1.0 --set train.rounds=5
# 3. The suites that use the device; dp_training sized to fit the 8 minutes.
suites="$runs/suites"
mkdir -p "$suites"
cp benchmarks/*.toml "$suites/"
sed -i -e 's/^hidden = .*/hidden = [64, 256, 1024]/' -e 's/^epochs = .*/epochs = 1/' "$suites/dp_training.toml"
bench() {  # name, then fedgov.bench arguments; keeps results.json and report.md
  local name=$1; shift
  "$PYTHON" -m fedgov.bench --device "$DEVICE" --suites-dir "$suites" --out "$runs/$name" "$@" > "$runs/$name.out" \
    2> "$runs/$name.err" || { tail -5 "$runs/$name.err" | tee -a "$log"; exit 1; }
  grep -E '^\[[a-z_]+\] ' "$runs/$name.err" | tee -a "$log" || true
  cp "$runs/$name/results.json" "$results/$name.results.json"
  cp "$runs/$name/report.md" "$results/$name.report.md"
}
bench dp_training --suite dp_training
bench round_realtime_quick --quick --suite round --suite realtime
echo "gpu_check: done in $SECONDS s" | tee -a "$log"
