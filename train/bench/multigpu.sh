#!/usr/bin/env bash
# Stage-1 ViT-B/16 img/s per strategy on one host (docs/performance.md, checkpoints/benchmarks/zero*.json):
#   bash train/bench/multigpu.sh gpu1 ddp2 zero2 zero2_check zero3 ...     (on the GPU machine; see docs/performance.md)
# Each NAME is one `python -m train task=stage1` run (eager, bf16-mixed, batch 256 per GPU, decode-once shards,
# STEPS batches, no validation) with Lightning's ThroughputMonitor; prints a JSON line per run (per-GPU img/s of
# each logged window and their median). A 20,000-scene synthetic run with its shards is built first under $ROOT.
# PROF=1 adds train.bench.profile.StepProfiler (steps 30-35; the windows it covers read low). A NAME that is not
# below is taken as Hydra overrides. The DeepSpeed runs end with an error after training: with validation off there
# is no best checkpoint to export (by design). $OUT (default .) receives the logs.
set -u
STEPS=${STEPS:-60}
ROOT=${ROOT:-/tmp/multigpu-bench}
OUT=${OUT:-.}
if [ ! -f "$ROOT/run" ]; then
  python3 -m train task=data paths.checkpoints_dir="$ROOT" model=vit_b16 data.source.n_scenes=20000 \
    data.source.views_per_scene=2 data.splits.train=0.95 data.splits.val=0.05 data.splits.meta=0 \
    data.splits.calib=0 data.splits.test=0 data.num_workers=15 > "$OUT/data.log" 2>&1 || { tail -30 "$OUT/data.log"; exit 1; }
  ls -d "$ROOT"/*/ | head -1 > "$ROOT/run"
  python3 -m train task=prepare run_dir="$(cat "$ROOT/run")" model=vit_b16 data.num_workers=15 > "$OUT/prepare.log" 2>&1 \
    || { tail -30 "$OUT/prepare.log"; exit 1; }
fi
RUN=$(cat "$ROOT/run")
BASE="task=stage1 run_dir=$RUN model=vit_b16 model.backbone.pretrained=false data.train_source=shards data.batch_size=256
  data.num_workers=6 model.channels_last=false model.compile=false trainer.max_epochs=1 trainer.limit_train_batches=$STEPS
  trainer.limit_val_batches=0 trainer.num_sanity_val_steps=0 callbacks=throughput trainer.log_every_n_steps=5"
for name in "$@"; do
  case $name in
    gpu1) extra="trainer=gpu";;
    gpu1_compiled) extra="trainer=gpu model.compile=true";;
    ddp2) extra="trainer=ddp trainer.devices=2";;
    zero2) extra="trainer=deepspeed_stage2 trainer.devices=2";;
    zero2_check) extra="trainer=deepspeed_stage2 trainer.devices=2 trainer.strategy.grad_overflow_check=true";;
    zero2_1gpu) extra="trainer=deepspeed_stage2 trainer.devices=1";;
    zero2_noclip) extra="trainer=deepspeed_stage2 trainer.devices=2 trainer.gradient_clip_val=null";;
    zero2_compiled) extra="trainer=deepspeed_stage2 trainer.devices=2 model.compile=true";;
    zero3) extra="trainer=deepspeed_stage3 trainer.devices=2";;
    zero2_offload) extra="trainer=deepspeed_stage2_offload trainer.devices=2";;
    zero3_offload) extra="trainer=deepspeed_stage3_offload trainer.devices=2";;
    *) extra="$name";;
  esac
  [ -n "${PROF:-}" ] && extra="$extra +callbacks.profile={_target_:train.bench.profile.StepProfiler,name:$name}"
  start=$(date +%s)
  # shellcheck disable=SC2086  # the overrides are words
  timeout "${TLIM:-240}" python3 -m train $BASE $extra > "$OUT/$name.log" 2>&1; rc=$?
  csv=$(ls -t $(find "$RUN" -name metrics.csv) | head -1)
  python3 - "$csv" "$name" "$rc" "$(( $(date +%s) - start ))" <<'PY'
import csv, json, statistics, sys
path, name, rc, wall = sys.argv[1:]
vals = [float(r["train/device/samples_per_sec"]) for r in csv.DictReader(open(path)) if r.get("train/device/samples_per_sec")]
print(json.dumps({"name": name, "rc": int(rc), "wall_s": int(wall), "device_img_s": [round(v, 1) for v in vals],
                  "median": round(statistics.median(vals), 1) if vals else None}))
PY
  rm -rf "$RUN/stage1"
done
