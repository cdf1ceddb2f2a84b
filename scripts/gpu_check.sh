#!/usr/bin/env bash
# One command for a lent GPU machine (issue 29): distcl doctor on it, then the quickstart
# with 1 GPU worker in bf16 and in fp32, images/s and matrices side by side; the GPU
# transform bench (issue 32) and faiss-gpu in the eval bench where faiss-gpu is installed.
#   scripts/gpu_check.sh [OUT]          (OUT: where runs and the summary go; default runs/gpu)
# Everything runs from this checkout's .venv (carry it, or install torch with CUDA and
# faiss-gpu into it first: `pip install -e ".[gpu,dev]"`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
{
  echo "== $(date -u +%FT%TZ) $(hostname); $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "== distcl doctor (precision bf16)"
  $PY -m distcl.cli doctor jobs/quickstart.yaml --set train.precision=bf16 --set train.use_gpu=yes \
    --set train.workers=1
  for p in bf16 fp32; do
    echo "== quickstart, 1 GPU worker, $p"
    s=$(date +%s)
    $PY -m distcl.cli run jobs/quickstart.yaml --no-progress --set train.workers=1 \
      --set train.use_gpu=yes --set train.precision=$p --set output.root="$OUT" \
      --set name=quickstart-gpu-$p
    echo "wall $(( $(date +%s) - s )) s"
  done
  echo "== side by side (images/s of the last epoch per task; the CMC@1 matrix)"
  $PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for p in ("bf16", "fp32"):
    run = out / f"quickstart-gpu-{p}"
    m = json.loads((run / "metrics.json").read_text())
    ips = [json.loads((run / "models" / str(t) / "history.json").read_text())[-1]["new_images_per_s"]
           for t in range(m["tasks"])]
    block = m["protocols"]["all"]
    print(f"{p}: new img/s per task {[round(x) for x in ips]}, AC {block['summary']['ac']:.3f} "
          f"AM {block['summary']['am']:.3f}")
    for row in block["matrices"]["cmc@1"]:
        print("   ", " ".join("  -  " if v != v else f"{v:.3f}" for v in row))
PY
  echo "== bench transform (h on a GPU beside the CPU)"
  $PY -m distcl.cli bench transform --rows 1000000 --inner 2048
  echo "== bench eval (faiss on the GPU where faiss-gpu is installed)"
  $PY -m distcl.cli bench eval --rows 1000000 --tasks 3
} 2>&1 | tee "$OUT/gpu_check.txt"
