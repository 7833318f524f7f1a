#!/usr/bin/env bash
# The GPU checks and figures of the step's speed paths, as one prepared run on a GPU
# machine (docs/trainer.md, "Faster steps on the GPU"). Two parts, each sized to fit
# one 10-minute command:
#
#   tools/gpu_measure.sh steps   GPU tests; steady samples/s of SD 1.5 at 512 px, batch 4
#                                (eager fused/unfused, regional and full compile with CUDA
#                                graphs) and SDXL at 1024 px, batch 1; the memory probe
#                                planning for 24 GiB; the reference's steady rate
#   tools/gpu_measure.sh job     the whole 1,500-step SD 1.5 job at batch 4, ours (regional
#                                compile, cold caches) against the reference's wall time
#
# The machine has no network. Python packages it lacks go as wheels in .whl/ (ignored;
# e.g. `pip download --no-deps -d .whl diffusers==0.42.1 torchvision==<its torch's>`),
# diffusers' examples/dreambooth/train_dreambooth_lora.py and _sdxl.py in .ref/ (ignored,
# never committed); carry both. Results: JSON lines and logs under $OUT (or /tmp).
set -uo pipefail

PART="${1:-steps}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/gpu-measure}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/trainer_image:$ROOT/functions" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --find-links .whl .whl/*.whl 2>&1 | tail -3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

bench() {  # bench NAME ARGS...: one JSON line into $OUT/bench.jsonl, the log beside it
  local name="$1"; shift
  echo "== bench $name: $*"
  "$PY" -m lora_trainer.bench --quiet --out "$OUT/bench.jsonl" "$@" >"$OUT/bench-$name.log" 2>&1 \
    || echo "   failed: see bench-$name.log"
  tail -1 "$OUT/bench-$name.log"
}

reference() {  # reference KIND SCRIPT STEPS BATCH RESOLUTION
  local script=".ref/$2"
  if [[ ! -f "$script" ]]; then echo "== reference $1: no $script (skipped)"; return; fi
  echo "== reference $1: $2 steps $3"
  "$PY" tools/reference_bench.py --script "$script" --kind "$1" --steps "$3" --batch "$4" \
    --resolution "$5" --work-dir "$OUT/ref-work" --out "$OUT/reference.jsonl" \
    >"$OUT/reference-$1.log" 2>&1 || echo "   failed: see reference-$1.log"
  tail -1 "$OUT/reference-$1.log"
}

case "$PART" in
  steps)
    echo "== GPU tests"
    "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/trainer/test_trainer_gpu.py \
      tests/trainer/test_trainer_gpu_sync.py 2>&1 | tail -15 | tee "$OUT/gpu-tests.log"
    bench sd15-eager --model sd15 --batch 4 --steps 50 --warmup 10
    bench sd15-unfused --model sd15 --batch 4 --steps 50 --warmup 10 --no-fused-lora
    bench sd15-regional --model sd15 --batch 4 --steps 50 --warmup 10 --compile regional
    bench sd15-full --model sd15 --batch 4 --steps 50 --warmup 10 --compile full
    bench sd15-l4 --model sd15 --batch 4 --steps 20 --warmup 5 --gpu-memory-gib 24
    bench sdxl-b1 --model sdxl --batch 1 --steps 30 --warmup 5
    bench sdxl-b1-regional --model sdxl --batch 1 --steps 30 --warmup 5 --compile regional
    bench sdxl-l4 --model sdxl --batch 1 --steps 10 --warmup 3 --gpu-memory-gib 24
    reference sd train_dreambooth_lora.py 30,90 4 512
    ;;
  job)
    echo "== whole job, ours"
    "$PY" -m lora_trainer.bench_job --model sd15 --steps 1500 --batch 4 --compile regional \
      --identity-checkpoints 0 --quiet --out "$OUT/job.jsonl" >"$OUT/job.log" 2>&1 || echo "   failed: see job.log"
    tail -30 "$OUT/job.log"
    reference sd train_dreambooth_lora.py 1500 4 512
    ;;
  *) echo "usage: $0 steps|job" >&2; exit 2 ;;
esac
ls -la "$OUT"
