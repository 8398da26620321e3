#!/bin/bash
# The README's latent-diffusion table: pixel U-Net, latent U-Net and latent DiT at one budget.
#
#   bash benchmarks/study_latent.sh [OUT=runs/study_latent] [DATA=../shared/data/fashion_mnist]
#
# 1. bench_latent.py times a train step of each model in paired rounds (medians).
# 2. The budget is 600 steps of the pixel model (configs/fashion_mnist.py); the latent runs get
#    what is left of it after training the autoencoder (600 steps) and encoding the training
#    split, converted into steps with the paired step times, rounded down to 100.
# 3. FD of 1,000 samples (DPM-Solver++(2M), 20 steps, seed 0) with the dataset's classifier
#    against the test split; the autoencoder's reconstructions of 1,000 test images (PSNR and
#    their FD: the floor of any model on these latents); and 1,000 real training images'
#    FD (the floor of any model).
# About 2 hours on a 2-core CPU. Every step is a plain jaxdiff command or library call.
set -euo pipefail
OUT=${1:-runs/study_latent}
DATA=${2:-../shared/data/fashion_mnist}
PY=${PY:-.venv/bin/python}
JAXDIFF=${JAXDIFF:-.venv/bin/jaxdiff}
mkdir -p "$OUT/eval"

$JAXDIFF train-classifier --config configs/fashion_mnist.py --config.data.manual_dir="$DATA"
$PY benchmarks/bench_latent.py --rounds 3 --steps 10 | tee "$OUT/bench_latent.txt"
$JAXDIFF train --config configs/fashion_mnist.py --workdir "$OUT/pixel" \
  --config.data.manual_dir="$DATA" --config.training.num_steps=800 \
  --config.training.checkpoint_every=100 --config.training.keep_checkpoints=10 \
  --config.training.sample_every=0
$JAXDIFF train --config configs/fashion_mnist_autoencoder.py --workdir "$OUT/ae" \
  --config.data.manual_dir="$DATA"

# Encoding the training split (timed: it is part of the latent runs' cost).
start=$(date +%s.%N)
$PY - "$OUT/ae" "$DATA" <<'PYEOF'
import sys
from jaxdiff import config as c, latent, parallel
from jaxdiff.config import read_config
from jaxdiff.training.state import build, restore
ae_dir, data = sys.argv[1:]
cfg = c.from_file("configs/fashion_mnist_latent.py")
cfg.latent.autoencoder_workdir = ae_dir
cfg.data.manual_dir = data
cfg = latent.resolve(cfg)
mesh = parallel.make_mesh()
ae = read_config(ae_dir)
_, state, _ = restore(ae, f"{ae_dir}/checkpoints", mesh)
latent.latent_source(cfg, latent.encoder(build(ae)[0], state.ema_params, cfg.latent.scale_factor), mesh)
PYEOF
end=$(date +%s.%N)
read -r NU ND <<< "$($PY - "$(tail -1 "$OUT/bench_latent.txt")" "$start" "$end" <<'PYEOF'
import json, sys
t, start, end = json.loads(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
budget = 600 * t["pixel U-Net"] - 600 * t["autoencoder"] - (end - start)
print(int(budget / t["latent U-Net"]) // 100 * 100, int(budget / t["latent DiT"]) // 100 * 100)
PYEOF
)"
echo "encode_seconds=$($PY -c "print($end - $start)") latent_unet_steps=$NU latent_dit_steps=$ND" \
  | tee "$OUT/budget.txt"
for run in latent:fashion_mnist_latent:$NU dit:fashion_mnist_latent_dit:$ND; do
  IFS=: read -r name config steps <<< "$run"
  $JAXDIFF train --config "configs/$config.py" --workdir "$OUT/$name" \
    --config.latent.autoencoder_workdir="$OUT/ae" --config.data.manual_dir="$DATA" \
    --config.training.num_steps="$steps" --config.training.checkpoint_every=500 \
    --config.training.sample_every=0
done

FD="$JAXDIFF evaluate --metric fd --num_samples 1000 --sampler dpm++2m --steps 20 --seed 0"
$FD --workdir "$OUT/pixel" --checkpoint_step 600 --out "$OUT/eval/pixel"
$FD --workdir "$OUT/latent" --out "$OUT/eval/latent"
$FD --workdir "$OUT/dit" --out "$OUT/eval/dit"
$JAXDIFF evaluate --workdir "$OUT/ae" --metric recon --split test --num_examples 1000 \
  --out "$OUT/eval/ae"
$PY - "$OUT/pixel" <<'PYEOF'
import sys
sys.path.insert(0, "benchmarks")
import study_fashion_mnist as study
from jaxdiff import evaluation
from jaxdiff.run import load_run
config = load_run(sys.argv[1]).config
net, _ = study._classifier(config, None)
reference, _ = evaluation.reference_stats(
  net, config.data, split="test", cache_dir=evaluation.cache_dir(None)
)
print(f"data floor: FD of 1000 real training images = {study._data_floor(config, net, reference, 1000):.2f}")
PYEOF
