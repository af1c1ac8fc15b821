#!/usr/bin/env bash
# The prepared GPU check (issue 12, item 7): run on a machine with at least one CUDA GPU, from the checkout.
#
#   benchmarks/gpu_check.sh [--out DIR] [--python PY] [--skip-label] [--skip-train] [--dry-run] [--help]
#
# Steps (each with its own time limit; the whole script is sized for well under 10 minutes on one GPU):
#   1 env        GPU names and count, torch and CUDA versions
#   2 parity     base preset (random weights, seed 0), one 480x640 photo: CUDA fp32 and CUDA bf16 against
#                CPU fp32. Tolerances: fp32 max |d prob| <= 1e-3 and label agreement >= 99.9 %;
#                bf16 mean |d prob| <= 2e-2 and label agreement >= 97 %
#   3 speed      benchmarks/model_throughput.py, base at 640x640, batch 8: bf16 model and predict, fp32 model
#   4 memory     peak CUDA memory of one base forward (bf16, 640x640) at batch 1, 2, 4, 8, 16
#   5 label      ebseg label of 64 photos with a random base checkpoint: --gpus-per-actor 1 (1 actor), then
#                --gpus-per-actor 0.5 (2 actors on one GPU); both outputs checked with ebseg query
#   6 train      ebseg train, tiny preset, 30 steps on the GPU (NCCL when 2+ GPUs: one worker per GPU, at
#                most 2), AMP fp16 with the gradient scaler, a checkpoint every 10 steps; then the same run
#                name to 40 steps: it must resume from step 30
# Results: DIR/gpu_check.log (every line printed), DIR/*.json (one per step). Exit status: the number of
# failed steps (0 = all passed).
set -uo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

OUT="${TMPDIR:-/tmp}/ebseg-gpu-check"
PY="${PYTHON:-python}"
SKIP_LABEL=0
SKIP_TRAIN=0
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a directory" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || { echo "gpu_check.sh: --python needs a path" >&2; exit 2; }; PY="$2"; shift 2 ;;
    --skip-label) SKIP_LABEL=1; shift ;;
    --skip-train) SKIP_TRAIN=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
EBSEG=("$PY" -m jobs)
LOG="$OUT/gpu_check.log"
STEPS=(env parity speed memory)
[ "$SKIP_LABEL" = 1 ] || STEPS+=(label)
[ "$SKIP_TRAIN" = 1 ] || STEPS+=(train)

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check.sh: would run steps: ${STEPS[*]}"
  echo "  output: $OUT   python: $PY   repo: $REPO"
  exit 0
fi

mkdir -p "$OUT"
: > "$LOG"
FAILED=0
say() { echo "$*" | tee -a "$LOG"; }
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log its output, count a failure
  local name="$1" limit="$2"; shift 2
  say "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "=== $name: $([ "$rc" = 0 ] && echo PASS || echo "FAIL (exit $rc)") in $((SECONDS - start)) s"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  say "gpu_check.sh: torch sees no CUDA GPU here; nothing to check"; exit 1; }
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
WORKERS=$(( GPUS >= 2 ? 2 : 1 ))

step env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  '$PY' -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpus\", torch.cuda.device_count(), \"bf16\", torch.cuda.is_bf16_supported())'"

step parity 90 "$PY" - "$OUT/parity.json" <<'EOF'
import json, sys
import numpy as np, torch
from PIL import Image
from skimage import data
from ebseg.build import build_ebseg
from ebseg.predictor import Segmenter

torch.manual_seed(0)
model = build_ebseg("base")
photo = np.asarray(Image.fromarray(data.astronaut()).resize((640, 480)))
names = ["person", "sky", "building", "tree", "grass", "road", "car", "flower", "rocket", "wall"]

def run(device, amp):
    seg = Segmenter(model, names, device=device, amp_dtype=amp, batch_size=1)
    [p] = seg.predict([photo], return_probabilities=True)
    return p

cpu = run("cpu", None)
report, ok = {}, True
for name, amp, max_tol, mean_tol, agree_min in [("fp32", None, 1e-3, None, 0.999), ("bf16", torch.bfloat16, None, 2e-2, 0.97)]:
    got = run("cuda", amp)
    diff = np.abs(got.probabilities - cpu.probabilities)
    agree = float((got.label_map == cpu.label_map).mean())
    passed = agree >= agree_min and (max_tol is None or diff.max() <= max_tol) and (mean_tol is None or diff.mean() <= mean_tol)
    report[name] = {"max_abs_prob_diff": float(diff.max()), "mean_abs_prob_diff": float(diff.mean()),
                    "label_agreement": agree, "passed": bool(passed)}
    ok &= passed
    print(name, report[name])
json.dump(report, open(sys.argv[1], "w"), indent=2)
sys.exit(0 if ok else 1)
EOF

speed() {
  local vocab="person,sky,building,tree,grass,road,car,flower,rocket,wall"
  for run in "bf16 model" "bf16 predict" "fp32 model"; do
    set -- $run
    "$PY" "$REPO/benchmarks/model_throughput.py" --preset base --size 640 --batch-size 8 --device cuda \
      --dtype "$1" --mode "$2" --iters 10 --warmup 3 --vocabulary "$vocab" --json \
      | tee -a "$OUT/speed.jsonl" || return 1
  done
}
step speed 120 speed

step memory 60 "$PY" - "$OUT/memory.json" <<'EOF'
import json, sys
import torch
from ebseg.build import build_ebseg

torch.manual_seed(0)
model = build_ebseg("base").cuda().eval()
with torch.inference_mode():
    text = model.text.encode_names(["person", "sky", "tree", "road", "car"])
report = {}
for batch in (1, 2, 4, 8, 16):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    images = torch.randint(0, 255, (batch, 3, 640, 640), dtype=torch.uint8, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(images, text, image_sizes=[(640, 640)] * batch)
    torch.cuda.synchronize()
    report[batch] = torch.cuda.max_memory_allocated()
    print(f"batch {batch:2d}: peak {report[batch] / 2**30:.2f} GiB")
json.dump(report, open(sys.argv[1], "w"), indent=2)
EOF

label() {
  "$PY" - "$OUT" <<'EOF' || return 1
import sys, torch
from pathlib import Path
from PIL import Image
from skimage import data
from ebseg import checkpoint
from ebseg.build import build_ebseg

out = Path(sys.argv[1]); (out / "photos").mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
checkpoint.save(build_ebseg("base"), str(out / "base-random.pt"))
photos = [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")]
for i in range(64):
    size = [(640, 480), (480, 640), (800, 450), (512, 512)][i % 4]
    Image.fromarray(photos[i % 4]).convert("RGB").resize(size).save(out / "photos" / f"{i:03d}.jpg")
EOF
  for case in "1 1" "0.5 2"; do
    set -- $case
    local dest="$OUT/labels-gpus$1"
    rm -rf "$dest"
    "${EBSEG[@]}" label "$OUT/photos" "$dest" --model "$OUT/base-random.pt" --vocabulary ade150 \
      --gpus-per-actor "$1" --actors "$2" --batch-size 8 --files-per-shard 32 --no-progress --json \
      | tee "$OUT/label-gpus$1.json" || return 1
    "${EBSEG[@]}" query "$dest" "SELECT count(*) AS images, count(DISTINCT image_id) AS distinct_ids FROM images WHERE status = 'ok'" \
      --format json | tee -a "$LOG" | grep -q '"images": 64' || { echo "label: expected 64 ok images in $dest"; return 1; }
  done
}
[ "$SKIP_LABEL" = 1 ] || step label 200 label

train() {
  "$PY" -m ebseg.data.shapes "$OUT/shapes" --count 64 --seed 0 --size 128 || return 1
  rm -rf "$OUT/runs"
  local common=(--data "$OUT/shapes" --storage "$OUT/runs" --name gpu-check --model tiny --loss tiny
    --trainable all --crop-size 128 --batch-size 4 --workers "$WORKERS" --use-gpu --amp fp16
    --checkpoint-every 10 --log-every 10 --json)
  "${EBSEG[@]}" train "${common[@]}" --steps 30 | tee "$OUT/train.json" || return 1
  "${EBSEG[@]}" train "${common[@]}" --steps 40 | tee "$OUT/train-resumed.json" || return 1
  grep -q '"step": 30' "$OUT/train.json" || { echo "train: the first run did not end at step 30"; return 1; }
  grep -q '"step": 40' "$OUT/train-resumed.json" || { echo "train: the resumed run did not end at step 40"; return 1; }
  grep -i "resum" "$LOG" | tail -3  # Ray Train's own note of the checkpoint it restored, when it prints one
}
[ "$SKIP_TRAIN" = 1 ] || step train 100 train

say "gpu_check.sh: $FAILED failed step(s); log $LOG"
exit "$FAILED"
