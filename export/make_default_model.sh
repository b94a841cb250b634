#!/usr/bin/env bash
# The recipe of the shipped model (edgecap/assets/default), from a fresh clone with the dev
# install. Flickr8k train + dev at $DATA (token file, split files, images/). CPU only; on the
# 2-core machine of the README about 45 min of cross-entropy training + 25 min of SCST.
set -euo pipefail
DATA=${DATA:-../shared/data/flickr8k}
RUNS=${RUNS:-runs}

# 1. Cross-entropy (teacher forcing) on cached, frozen EfficientNet-Lite0 features; the best
#    epoch by dev CIDEr (greedy) is kept in $RUNS/sat-h512/best.
edgecap train --data "$DATA" --out "$RUNS/sat-h512" --cache-dir "$RUNS/.feature-cache" \
    --epochs 12 --batch-size 100 --lr 5e-4 --lr-decay-epochs 4 --patience 3 --threads 2

# 2. Self-critical training on CIDEr-D from that checkpoint.
edgecap train --data "$DATA" --out "$RUNS/sat-h512-scst" --cache-dir "$RUNS/.feature-cache" \
    --scst-from "$RUNS/sat-h512/best" --epochs ${SCST_EPOCHS:-5} --lr 2e-5 --threads 2

# 3. Export, score on the dev split (beam 3), and export again with the metrics in the manifest
#    (the export is deterministic: the ONNX files are byte-identical).
OUT=edgecap/assets/default
edgecap export "$RUNS/sat-h512-scst/best" --out "$OUT" --name sat-lite0-flickr8k
edgecap eval --model "$OUT" --images "$DATA/images" --captions "$DATA/Flickr8k.token.txt" \
    --split "$DATA/Flickr_8k.devImages.txt" --beam-size 3 --json --no-progress > "$RUNS/dev-beam3.json"
edgecap export "$RUNS/sat-h512-scst/best" --out "$OUT" --name sat-lite0-flickr8k \
    --metrics "$RUNS/dev-beam3.json"
