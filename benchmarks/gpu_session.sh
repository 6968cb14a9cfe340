#!/usr/bin/env bash
# Every GPU figure of docs/performance.md and docs/models.md, in one call on a lent GPU machine: the steps below in
# order, as many as fit in GPU_SESSION_SECONDS (9 minutes by default; all of them need about 25).
#
#   bash ../shared/gpu/fetch-wheels     # here: MLflow's and pycocotools' wheels into .whl (Python 3.12), then
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl orjson==3.13.0 ultrafast-pycocotools==0.1.14
#   device run, carry [".whl"], timeout_s 600:  bash benchmarks/gpu_session.sh
#
# Steps, most important first, each under its own time limit so that a slow one cannot cost the others; a
# step that no longer fits in what is left of GPU_SESSION_SECONDS (default 540) is skipped, and says so:
#   0a. sync_free: benchmarks.gpu_train_bench --check-rpn, bf16, FCOS, RetinaNet, Faster and Mask R-CNN: the plain
#      loop, ours (worker decode), with train.sync_free_inputs, with train.sync_free_loss too (FCOS) and with
#      train.parallel_rpn too (R-CNN); then a profile and sync census of FCOS with both sync-free levers
#   0b. compile_sync_free: benchmarks.gpu_train_bench --compile, FCOS, bf16: the plain loop against ours with both
#      sync-free levers and torch.compile of the backbone
#   0c. levers_stages: benchmarks.gpu_check: the train and evaluate stages, bf16, the default model with the
#      sync-free levers, and Faster R-CNN with parallel_rpn and sync_free_inputs, its DataLoader workers forked anew
#      each epoch beside parallel_rpn's threads (the amp-bf16 and fasterrcnn-levers cases: docs/gpu_check_levers.json)
#   1. canvas: benchmarks.gpu_train_bench --photo-sizes --cudnn-benchmark off, bf16: images of many sizes, the plain
#      loop, ours (worker decode), ours with batches grouped by orientation, and that with model.fixed_canvas;
#      Faster R-CNN (measured once with cuDNN's benchmark on: far slower than the plain loop, docs/performance.md)
#   2. masks: benchmarks.gpu_train_bench, Mask R-CNN, bf16: the plain loop, ours (masks cut to the objects, the
#      default), ours with image-sized masks (train.mask_targets: full) (measured once: no gain)
#   3. train_bench: benchmarks.gpu_train_bench --check-rpn, bf16: train.parallel_rpn's proposals against
#      torchvision's, then the plain torchvision loop, ours with nvJPEG decode, ours with worker decode, and that
#      with train.parallel_rpn, 4 models; then a torch.profiler table of ours on Faster R-CNN and a census of its
#      host-device syncs (profile.txt)
#   4. default: benchmarks.bench_default --seeds 0 --until evaluate: the default params trained on the GPU
#   5. stages: benchmarks.gpu_check: the train and evaluate stages with fp16 + gradient scaler, DDP under torchrun
#   6. train_fp32: benchmarks.gpu_train_bench in fp32, plain against ours
#   7. infer: benchmarks.bench_infer --device cuda: inference img/s per model family
#   8. compile: benchmarks.gpu_train_bench --compile (Faster R-CNN, bf16)
# Writes $OUT/session.log (every step's output) and one JSON per step. Exit status: 1 if a step failed, else 3 if
# one was skipped, else 0. GPU_SESSION_SMOKE=1 runs each step at
# toy sizes on the CPU, to catch a broken step before device time is spent on it; GPU_SESSION_STEPS="infer compile"
# runs only those steps.
set -u
out=${OUT:-gpu-session}
mkdir -p "$out"
log=$out/session.log
budget=${GPU_SESSION_SECONDS:-540}
smoke=${GPU_SESSION_SMOKE:-0}
py=${PYTHON:-python3}
steps=" ${GPU_SESSION_STEPS:-sync_free compile_sync_free levers_stages canvas masks train_bench default stages train_fp32 infer compile} "  # a rerun can name fewer
export PYTHONUNBUFFERED=1
failed=0
skipped=0

if [ -d .whl ] && [ "$smoke" != 1 ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing the carried wheels failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME SECONDS COMMAND...: run COMMAND under min(SECONDS, what is left), its output into the log
  local name=$1 want=$2 left=$((budget - SECONDS))
  shift 2
  [[ $steps == *" $name "* ]] || return 0
  if ((left < want / 2)); then
    echo "== $name: skipped, $left s left of $budget" | tee -a "$log"
    skipped=1
    return
  fi
  ((want > left)) && want=$left
  echo "== $name (limit $want s): $*" | tee -a "$log"
  local began=$SECONDS rc=0
  timeout -k 10 "$want" "$@" >>"$log" 2>&1 || rc=$?
  echo "== $name: exit $rc after $((SECONDS - began)) s" | tee -a "$log"
  ((rc == 0)) || failed=1
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  lscpu | grep -m1 "Model name"
  $py -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.is_available())"
} >>"$log" 2>&1

if [ "$smoke" = 1 ]; then
  step sync_free 300 $py -m benchmarks.gpu_train_bench --smoke --check-rpn --models fcos_resnet50_fpn \
    fasterrcnn_resnet50_fpn --loops plain ours-worker-decode ours-sync-free ours-sync-free-loss ours-sync-free-rpn \
    --json "$out/gpu_train_sync_free.json" --profile "$out/profile_sync_free.txt" --profile-loop ours-sync-free-loss
  step compile_sync_free 300 $py -m benchmarks.gpu_train_bench --smoke --compile --loops plain ours-sync-free-loss \
    --json "$out/gpu_train_compile_sync_free.json"
  step levers_stages 300 $py -m benchmarks.gpu_check --device cpu --epochs 1 --images 8 \
    --cases sync-free fasterrcnn-levers-forked --json "$out/gpu_check_levers.json"
  step canvas 300 $py -m benchmarks.gpu_train_bench --smoke --photo-sizes --cudnn-benchmark off \
    --loops plain ours-worker-decode ours-grouped ours-canvas --json "$out/gpu_train_canvas.json"
  step masks 300 $py -m benchmarks.gpu_train_bench --smoke --models maskrcnn_resnet50_fpn --amp on \
    --loops plain ours-worker-decode ours-full-masks --json "$out/gpu_train_masks.json"
  step train_bench 300 $py -m benchmarks.gpu_train_bench --smoke --check-rpn --json "$out/gpu_train_bench.json" \
    --loops plain ours ours-worker-decode ours-parallel-rpn --profile "$out/profile.txt"
  step default 600 $py -m benchmarks.bench_default --seeds 0 --until evaluate --json "$out/bench_default_gpu.json"
  step stages 600 $py -m benchmarks.gpu_check --device cpu --epochs 1 --images 8 \
    --cases amp-fp16-scaler ddp-1-process --json "$out/gpu_check.json"
  step train_fp32 300 $py -m benchmarks.gpu_train_bench --smoke --loops plain ours --json "$out/gpu_train_fp32.json"
  step infer 120 $py -m benchmarks.bench_infer --device cpu --images 1 --models ssdlite320_mobilenet_v3_large \
    --json "$out/bench_infer_gpu.json"
else
  step sync_free 330 $py -m benchmarks.gpu_train_bench --amp on --check-rpn --models fcos_resnet50_fpn \
    retinanet_resnet50_fpn fasterrcnn_resnet50_fpn maskrcnn_resnet50_fpn --loops plain ours-worker-decode \
    ours-sync-free ours-sync-free-loss ours-sync-free-rpn --json "$out/gpu_train_sync_free.json" \
    --profile "$out/profile_sync_free.txt" --profile-loop ours-sync-free-loss
  step compile_sync_free 150 $py -m benchmarks.gpu_train_bench --compile --amp on --loops plain ours-sync-free-loss \
    --models fcos_resnet50_fpn --json "$out/gpu_train_compile_sync_free.json"
  step levers_stages 150 $py -m benchmarks.gpu_check --epochs 3 --images 64 --cases sync-free \
    fasterrcnn-levers-forked --json "$out/gpu_check_levers.json"
  step canvas 150 $py -m benchmarks.gpu_train_bench --photo-sizes --amp on --cudnn-benchmark off \
    --loops plain ours-worker-decode ours-grouped ours-canvas --models fasterrcnn_resnet50_fpn \
    --json "$out/gpu_train_canvas.json"
  step masks 90 $py -m benchmarks.gpu_train_bench --models maskrcnn_resnet50_fpn --amp on \
    --loops plain ours-worker-decode ours-full-masks --json "$out/gpu_train_masks.json"
  step train_bench 260 $py -m benchmarks.gpu_train_bench --amp on --check-rpn --json "$out/gpu_train_bench.json" \
    --loops plain ours ours-worker-decode ours-parallel-rpn --profile "$out/profile.txt"
  step default 160 $py -m benchmarks.bench_default --seeds 0 --until evaluate --json "$out/bench_default_gpu.json"
  step stages 110 $py -m benchmarks.gpu_check --epochs 1 --images 32 --cases amp-fp16-scaler ddp-1-process \
    --json "$out/gpu_check.json"
  step train_fp32 120 $py -m benchmarks.gpu_train_bench --amp off --loops plain ours \
    --models fasterrcnn_resnet50_fpn fcos_resnet50_fpn --json "$out/gpu_train_fp32.json"
  step infer 45 $py -m benchmarks.bench_infer --device cuda --images 20 --json "$out/bench_infer_gpu.json"
  step compile 120 $py -m benchmarks.gpu_train_bench --compile --amp on --loops plain ours \
    --models fasterrcnn_resnet50_fpn --json "$out/gpu_train_bench_compile.json"
fi
echo "== done after $SECONDS s, failed=$failed, skipped=$skipped" | tee -a "$log"
((failed)) && exit 1
((skipped)) && exit 3  # nothing failed, but not every step ran
exit 0
