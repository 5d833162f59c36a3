#!/usr/bin/env bash
# A GPU user's first run, checked and timed (docs/testing.md), on a GPU host:
#   bash train/bench/gpu_job.sh
# The GPU-marked end-to-end tests (tests/test_gpu.py), then the default job as a new GPU user types it
# (`python -m train trainer=gpu data.num_workers=$WORKERS`, fresh data and run folders under $ROOT): its exit code,
# wall time and stage times, Stage-1's test figures per validator level and the cascade's figures. $OUT (default .)
# receives the logs; SKIP_TESTS=1 times the job alone.
set -u
OUT=${OUT:-.}
ROOT=${ROOT:-/tmp/gpu-job}
WORKERS=${WORKERS:-12}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, timm, pytorch_lightning as pl; print('torch', torch.__version__, 'timm', timm.__version__,
                                                                'lightning', pl.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  start=$(date +%s)
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
  echo "GPU tests: rc=$? in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/gpu_tests.log")"
fi
rm -rf "$ROOT"
start=$(date +%s)
python3 -m train trainer=gpu data.num_workers="$WORKERS" paths.root_dir="$ROOT" paths.data_dir="$ROOT/data" \
  print_config=false > "$OUT/default_job.log" 2>&1
echo "default job: rc=$? in $(( $(date +%s) - start )) s"
grep -ho "stage '[a-z0-9_]*' done in [0-9.]* s" "$OUT/default_job.log"
python3 - "$ROOT"/checkpoints/pipeline-* <<'PY'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
metrics = json.loads((run / "registry.json").read_text())["tasks"].get("stage1", {}).get("metrics", {})
for level in sorted({int(k.split("/")[1][1:]) for k in metrics if k.startswith("test/L")}):
    m = {k: metrics.get(f"test/L{level}/{k}", float("nan")) for k in ("mcc", "mcc_low", "mcc_high", "acc", "reward")}
    print(f"stage1 test L{level}: MCC {m['mcc']:.4f} [{m['mcc_low']:.4f}, {m['mcc_high']:.4f}], "
          f"acc {m['acc']:.4f}, reward {m['reward']:.4f}")
cascade = run / "evaluate" / "cascade.json"
if cascade.is_file():
    c = json.loads(cascade.read_text())
    d = c["mcc_difference"]
    print("cascade exits:", {k: round(v, 3) for k, v in c["exit_fraction"].items()},
          f"FLOPs {c['flops']['ratio']:.2f}x fewer than {c['reference']} alone, "
          f"MCC difference {d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] on {c['n']} {c['split']} queries")
PY
