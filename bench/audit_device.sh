#!/usr/bin/env bash
# Issue #21 at scale, on a GPU machine without internet, cleanlab or imagehash: from the repo
# root, after `pip install -e . -e ./sample`, with bench/audit-data carried (written here by
# `bench/audit.py subset --out bench/audit-data --train 24000 --test 6000`, 13 MB, git-ignored):
#
#     bash bench/audit_device.sh            # figures under $OUT/audit21 (about 3 minutes)
#
# Fashion-MNIST at 64 px, PER train images per class (default 2,000: 20,000), 20% uniform
# label flips, `imattrain audit` with K folds, then one training per variant (seed 0; the
# noisy run alone, the rest side by side) and test top-1. Cut off after LIMIT seconds, it
# keeps what finished. Here afterwards, cleanlab on the same probabilities:
#     .venv/bin/python bench/audit.py cleanlab --oof DIR/oof_probs.parquet --flips DIR/flips.json
set -u
export PYTHONPATH="$PWD/sample${PYTHONPATH:+:$PYTHONPATH}"
W=${W:-/tmp/audit-dev}; R=${OUT:?set OUT}/audit21; SIZE=${SIZE:-64}; mkdir -p "$R"
start=$(date +%s)
python3 bench/audit.py prepare --source bench/audit-data --out "$W" --size "$SIZE" \
    --per-class "${PER:-2000}" --val-per-class "${VAL:-100}" --test-per-class "${TEST:-500}" \
    > "$R/log.txt" 2>&1
echo "prepare $(( $(date +%s) - start )) s" >> "$R/log.txt"
timeout -k 10 -s INT "${LIMIT:-150}" python3 bench/audit.py run --data "$W/clean" \
    --work "$W/work" --kinds uniform --rates 0.2 --no-cleanlab --no-clean --folds "${K:-4}" \
    --model resnet18 --image-size "$SIZE" --epochs "${EP:-6}" --batch-size "${BS:-128}" \
    --workers "${WK:-12}" --parallel "${PAR:-4}" --seeds 0 \
    --variants noisy,clean,drop@0.95,relabel@0.95,oracle >> "$R/log.txt" 2>&1
echo "bench exit $? after $(( $(date +%s) - start )) s" >> "$R/log.txt"
S=$W/work/uniform-20
cp "$W/work/results.json" "$S/retrain.json" "$S/flips.json" "$S/audit/oof_probs.parquet" \
    "$S/audit/audit.json" "$S"/v-*.json "$R/" 2>/dev/null
for d in "$S"/audit/fold-* "$S"/run-* "$W"/work/run-*; do
    [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$R/$(basename "$d")-metrics.jsonl"
    [ -f "$d/fold_probs.parquet" ] && cp "$d/fold_probs.parquet" "$R/$(basename "$d")-probs.parquet"
done
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv >> "$R/log.txt" 2>&1
tail -30 "$R/log.txt"
