#!/usr/bin/env bash
# The GPU path, checked on a machine with a GPU (the device tool: shared/device/pack.sh, then
#   source .dev/env.sh && bash benchmarks/device.sh
# ): a plain PyTorch loop on the GPU (the baseline), jobs/train.py --use-gpu (Ray Train on the GPU, evaluation
# by GPU predictor actors), jobs/tag.py --use-gpu over rendered photos. Logs and outputs under $OUT (default:
# /tmp/device-out).
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
work=$(mktemp -d)
data=${CLF_DATA_DIR:-.dev/data}
{
  nvidia-smi -L
  python3 -c 'import torch, ray; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "ray", ray.__version__)'
  lscpu | grep 'Model name'
} 2>&1 | tee "$OUT/machine.log"

echo "== plain GPU loop" | tee "$OUT/plain.log"
timeout 300 python3 benchmarks/plain_torch.py --device cuda --data-dir "$data" 2>&1 | tail -c 3000 | tee -a "$OUT/plain.log"

echo "== jobs/train.py --use-gpu" | tee "$OUT/train.log"
( time timeout 400 python3 jobs/train.py --use-gpu --data-dir "$data" --output "$work/run" --storage-path "$work/st" ) \
  2>&1 | tee -a "$OUT/train.log"
cp "$work/run/metrics.json" "$OUT/metrics.json" 2>/dev/null

echo "== jobs/tag.py --use-gpu" | tee "$OUT/tag.log"
python3 - "$data" "$work/photos" <<'PY' 2>&1 | tee -a "$OUT/tag.log"
import sys
from pathlib import Path
from clf import data
from tests.catalog import write_catalog
test = data.load(sys.argv[1]).test
write_catalog(Path(sys.argv[2]), test.images[:500])
print("500 photos written")
PY
( time timeout 300 python3 jobs/tag.py --use-gpu --checkpoint "$work/run" --input "$work/photos" --output "$work/tags" ) \
  2>&1 | tee -a "$OUT/tag.log"
cp "$work/tags/summary.json" "$OUT/tag-summary.json" 2>/dev/null
for f in "$work"/st/*/*.log /tmp/ray/session_latest/logs/clf-driver-*.err; do [ -f "$f" ] && tail -50 "$f"; done > "$OUT/ray-tail.log" 2>&1
exit 0
