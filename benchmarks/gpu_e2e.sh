#!/usr/bin/env bash
# End-to-end data feed on one GPU (issue 8): does Ray Data keep the real trainer fed?
#
#   sample data (JPEGs at RAW px) -> clipflow preprocess (Parquet at SIZE px) ->
#   benchmarks/feed_bench.py (the feed's CPU cost per core, crops on CPU vs on the GPU) ->
#   benchmarks/train_bench.py (Ray Data feed vs synthetic batches, same process, same model) ->
#   clipflow train on the GPU (Ray Train, 1 worker): samples/s and data-wait per log step, in the log
#   and in the MLflow run.
#
# Everything is sized by environment variables, so the same script smoke-runs on a CPU:
#   MODEL=tiny-vit BATCH=32 SAMPLES=600 RAW=96 SIZE=64 STEPS=4 USE_GPU=false benchmarks/gpu_e2e.sh
# On the lent GPU machine, after unpacking .gpu-bundle (benchmarks/GPU_E2E.md), the defaults apply.
# Output: $OUT (default $HOME_DIR/out): train_bench.log, train.log, and the stages' own summaries.
set -euo pipefail

MODEL=${MODEL:-ViT-B-32}       # clip_core zoo name
BATCH=${BATCH:-512}            # global batch = per-GPU batch (one worker)
SAMPLES=${SAMPLES:-8000}       # distinct training samples: >= 15 steps per epoch at the default batch
RAW=${RAW:-256}                # sample JPEG side: bigger than SIZE, so preprocessing really resizes
SIZE=${SIZE:-224}              # training resolution
STEPS=${STEPS:-30}             # timed steps per train_bench measurement; the train run does 2x
COMPILE=${COMPILE:-regional}   # model.compile
AUGMENT_ON=${AUGMENT_ON:-device}  # train.augment_on: where the random crops are cut
USE_GPU=${USE_GPU:-true}
HOME_DIR=${HOME_DIR:-/tmp/clipflow-e2e}
OUT=${OUT:-$HOME_DIR/out}
CLIPFLOW=${CLIPFLOW:-clipflow}

mkdir -p "$OUT"
common=(--set "home=$HOME_DIR" --set "model.name=$MODEL" --set "model.compile=$COMPILE"
        --set "train.global_batch_size=$BATCH" --set "train.augment_on=$AUGMENT_ON" --set tokenizer.context_length=77
        --set "preprocess.image_size=$SIZE")
stage() { echo "[gpu_e2e] $(date +%T) $*"; }

stage "sample data: $SAMPLES JPEGs at $RAW px"
$CLIPFLOW sample-data "${common[@]}" --set "sample_data.train_samples=$SAMPLES" --set sample_data.train_shards=16 \
  --set "sample_data.image_size=$RAW" | tee "$OUT/sample_data.log"

stage "preprocess to $SIZE px"
$CLIPFLOW preprocess "${common[@]}" | tee "$OUT/preprocess.log"

stage "feed_bench: crops on CPU vs on the device, $SIZE px"
python3 benchmarks/feed_bench.py --samples 2048 --size "$SIZE" --batch "$BATCH" --repeats 2 | tee "$OUT/feed_bench.log"

stage "train_bench: $MODEL, batch $BATCH, compile $COMPILE, crops on $AUGMENT_ON, $STEPS steps x 3"
python3 benchmarks/train_bench.py "${common[@]}" --steps "$STEPS" | tee "$OUT/train_bench.log"

stage "clipflow train on Ray Train (1 worker, use_gpu=$USE_GPU), $((2 * STEPS)) steps"
$CLIPFLOW train "${common[@]}" --set "scaling.use_gpu=$USE_GPU" --set scaling.min_workers=1 \
  --set scaling.max_workers=1 --set "train.max_steps=$((2 * STEPS))" --set train.log_every=5 \
  --set train.checkpoint_every=1000 --set train.warmup_steps=5 2>&1 | tee "$OUT/train.log"

stage "done: compare train.log's samples/s and data-wait with train_bench.log's synthetic line"
