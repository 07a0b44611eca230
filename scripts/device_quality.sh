#!/usr/bin/env bash
# Device-machine quality runs: the 60M transformer and the 60M Attamba trained briefly on the
# english-small corpus (.devdata/english, 32k SentencePiece), then WikiText-2 test perplexity
# through lm-eval (the shipped wikitext_local task) and held-out perplexity; and the MQAR recall
# configs (transformer, Attamba, Mamba2) trained briefly and scored by sequence length and number
# of pairs.
#
#   OUT=/tmp/q QUALITY_STEPS=300 RECALL_STEPS=1500 bash scripts/device_quality.sh
# QUALITY_MODELS and RECALL_MODELS pick the models (default: all of them); QUALITY_EXTRA and
# RECALL_EXTRA add overrides (space-separated), e.g. the easier recall setting:
#   RECALL_EXTRA=config=configs/recall_easy.yaml
# Eager by default: compiling the 60M Attamba takes minutes (one compile per layer, as each layer
# has its own cyclic offset), more than a few hundred eager steps cost. QUALITY_COMPILE=true compiles.
# PARALLEL=true starts every run at once on the one GPU (the recall models are small and
# launch-bound, so they barely slow the quality run); the scores do not depend on it, the times do.
set -u
OUT="${OUT:-/tmp/device_quality}"
QUALITY_STEPS="${QUALITY_STEPS:-300}"
RECALL_STEPS="${RECALL_STEPS:-1500}"
RUN_TIMEOUT="${RUN_TIMEOUT:-200}"
source "$(dirname "$0")/device_env.sh"
export PYTHONUNBUFFERED=1
data=.devdata/english

# run KIND MODEL CONFIG STEPS ARGS...: train one model with evaluation at the end, keep its results.
run() {
  local kind=$1 model=$2 config=$3 steps=$4; shift 4
  local app=$model; [ "$model" = transformer ] && app=main
  local dir=/tmp/$kind/$model
  rm -rf "$dir"
  local log="$OUT/${kind}_$model.log"  # in $OUT as it grows: a run cut short still leaves its log
  # SIGTERM makes the loop checkpoint and exit after the step in flight; SIGKILL 30 s later if not
  # (a run once outlived its SIGTERM by minutes while compiling).
  timeout -k 30 "$RUN_TIMEOUT" python -m apps.$app.train config=$config dump_dir=$dir steps=$steps \
    checkpoint.every=0 export_at_end=false eval_every=0 eval_at_end=true "$@" > "$log" 2>&1
  local status=$?
  local summary="$OUT/${kind}_$model.txt"  # one file per run: parallel runs never interleave
  echo "$kind $model exit $status" > "$summary"
  grep -E "INFO step " "$log" | tail -n 3 >> "$summary"
  cat "$dir/metrics.eval.jsonl" >> "$summary" 2>/dev/null
}

# start RUN ARGS...: run now, or in the background when PARALLEL=true.
start() {
  if [ "${PARALLEL:-false}" = true ]; then run "$@" & else run "$@"; fi
}

for model in ${QUALITY_MODELS:-transformer attamba}; do
  config=apps/attamba/configs/attamba_60m.yaml
  [ "$model" = transformer ] && config=apps/main/configs/transformer_60m.yaml
  start quality $model $config "$QUALITY_STEPS" \
    "data.sources={$data/train.jsonl: 1.0}" data.tokenizer.name=sp data.tokenizer.path=.devdata/sp32k.model \
    distributed.model_dtype=bf16 distributed.compile=${QUALITY_COMPILE:-false} optim.warmup=50 logging.freq=50 \
    "eval.tasks=[wikitext_local]" eval.wikitext_path=.devdata/wiki.test.tokens eval.batch_size=16 \
    "eval.val_sources={english: $data/valid.jsonl}" ${QUALITY_EXTRA:-}
done

declare -A recall_config=(
  [transformer]=apps/main/configs/recall_transformer.yaml
  [attamba]=apps/attamba/configs/recall_attamba_p8.yaml
  [mamba]=apps/mamba/configs/recall_mamba.yaml
)
for model in ${RECALL_MODELS:-transformer attamba mamba}; do
  start recall $model "${recall_config[$model]}" "$RECALL_STEPS" optim.warmup=100 logging.freq=250 ${RECALL_EXTRA:-}
done
wait
cat "$OUT"/quality_*.txt "$OUT"/recall_*.txt 2>/dev/null
