#!/usr/bin/env bash
# Device-machine training throughput: the 60M transformer and the 60M Attamba through the real
# training loop (torch.compile per block, bf16), at several sequence lengths with the tokens per
# step fixed at 16k, plus the data pipeline's own tokens/s. Needs .devdata/ (english-small jsonl
# and a 32k sentencepiece model) and, on a bare machine, the wheels in .whl/.
#
#   OUT=/tmp/train RUNS="transformer:1024 attamba:1024 transformer:4096 attamba:4096" bash scripts/device_train.sh
set -u
OUT="${OUT:-/tmp/device_train}"
RUNS="${RUNS:-transformer:1024 attamba:1024}"
STEPS="${STEPS:-60}"
RUN_TIMEOUT="${RUN_TIMEOUT:-420}"
EXTRA="${EXTRA:-}"
source "$(dirname "$0")/device_env.sh"
export PYTHONUNBUFFERED=1
data=.devdata/english/train.jsonl
tok=.devdata/sp32k.model

python benchmarks/bench_data.py --source $data --tokenizer sp --tokenizer-path $tok --batches 200 \
  --out "$OUT/data.json" 2>&1 | tail -1 | tee "$OUT/data.txt"

for run in $RUNS; do
  model=${run%%:*}; seq=${run##*:}; batch=$((16384 / seq))
  if [ "$model" = transformer ]; then app=main; config=apps/main/configs/transformer_60m.yaml
  else app=attamba; config=apps/attamba/configs/attamba_60m.yaml; fi
  dir=/tmp/runs/${model}_${seq}
  rm -rf "$dir"
  timeout -k 30 "${RUN_TIMEOUT:-420}" python -m apps.$app.train config=$config dump_dir=$dir steps=$STEPS \
    "data.sources={$data: 1.0}" data.tokenizer.name=sp data.tokenizer.path=$tok \
    data.seq_len=$seq data.batch_size=$batch model.max_seqlen=$seq \
    distributed.model_dtype=bf16 distributed.compile=true optim.warmup=10 logging.freq=10 \
    checkpoint.every=0 eval_at_end=false export_at_end=false $EXTRA > "$OUT/${model}_${seq}.log" 2>&1
  echo "$model $seq exit $?" >> "$OUT/exit_codes.txt"
  cp "$dir/metrics.jsonl" "$OUT/${model}_${seq}.metrics.jsonl" 2>/dev/null
done

python - "$OUT" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
print(f"{'model':<12}{'seq':>6}{'tok/s (median, after step 20)':>32}{'MFU %':>8}{'loss':>8}{'max mem GiB':>13}")
for path in sorted(out.glob("*.metrics.jsonl")):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steady = [r for r in rows if r["global_step"] > 20] or rows
    model, seq = path.name.split(".")[0].rsplit("_", 1)
    wps = statistics.median(r["speed/wps"] for r in steady)
    mfu = statistics.median(r["speed/MFU"] for r in steady)
    mem = max(r.get("memory/max_allocated_gib", 0) for r in rows)
    print(f"{model:<12}{seq:>6}{wps:>32,.0f}{mfu:>8.1f}{rows[-1]['loss/out']:>8.3f}{mem:>13.1f}")
PY
cat "$OUT/data.txt" "$OUT/exit_codes.txt"
