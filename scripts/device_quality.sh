#!/usr/bin/env bash
# Device-machine quality runs: the 60M transformer and the 60M Attamba trained briefly on the
# english-small corpus (.devdata/english, 32k SentencePiece), then WikiText-2 test perplexity
# through lm-eval (the shipped wikitext_local task) and held-out perplexity; and the MQAR recall
# configs trained briefly and scored by sequence length and number of pairs.
#
#   OUT=/tmp/q QUALITY_STEPS=300 RECALL_STEPS=1500 bash scripts/device_quality.sh
set -u
OUT="${OUT:-/tmp/device_quality}"
QUALITY_STEPS="${QUALITY_STEPS:-300}"
RECALL_STEPS="${RECALL_STEPS:-1500}"
RUN_TIMEOUT="${RUN_TIMEOUT:-200}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
data=.devdata/english

for model in transformer attamba; do
  if [ "$model" = transformer ]; then app=main; config=apps/main/configs/transformer_60m.yaml
  else app=attamba; config=apps/attamba/configs/attamba_60m.yaml; fi
  dir=/tmp/quality/$model
  rm -rf "$dir"
  timeout "$RUN_TIMEOUT" python -m apps.$app.train config=$config dump_dir=$dir steps=$QUALITY_STEPS \
    "data.sources={$data/train.jsonl: 1.0}" data.tokenizer.name=sp data.tokenizer.path=.devdata/sp32k.model \
    distributed.model_dtype=bf16 distributed.compile=true optim.warmup=50 logging.freq=50 \
    checkpoint.every=0 export_at_end=false eval_every=0 eval_at_end=true \
    "eval.tasks=[wikitext_local]" eval.wikitext_path=.devdata/wiki.test.tokens eval.batch_size=16 \
    "eval.val_sources={english: $data/valid.jsonl}" ${QUALITY_EXTRA:-} > "/tmp/quality_$model.log" 2>&1
  echo "quality $model exit $?" | tee -a "$OUT/quality.txt"
  tail -n 4 "/tmp/quality_$model.log" >> "$OUT/quality.txt"
  cat "$dir/metrics.eval.jsonl" >> "$OUT/quality.txt" 2>/dev/null
done

for model in transformer attamba; do
  if [ "$model" = transformer ]; then app=main; config=apps/main/configs/recall_transformer.yaml
  else app=attamba; config=apps/attamba/configs/recall_attamba_p8.yaml; fi
  dir=/tmp/recall/$model
  rm -rf "$dir"
  timeout "$RUN_TIMEOUT" python -m apps.$app.train config=$config dump_dir=$dir steps=$RECALL_STEPS \
    optim.warmup=100 logging.freq=250 checkpoint.every=0 export_at_end=false eval_every=0 eval_at_end=true \
    > "/tmp/recall_$model.log" 2>&1
  echo "recall $model exit $?" | tee -a "$OUT/recall.txt"
  tail -n 4 "/tmp/recall_$model.log" >> "$OUT/recall.txt"
  cat "$dir/metrics.eval.jsonl" >> "$OUT/recall.txt" 2>/dev/null
done
cat "$OUT/quality.txt" "$OUT/recall.txt"
