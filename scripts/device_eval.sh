#!/usr/bin/env bash
# WikiText-2 test perplexity of a run (or checkpoint, or export) on the device machine, through
# stock lm-eval and the shipped `wikitext_local` task.
#
# Here, once (the device reaches no network and no /work/shared):
#   bash scripts/device_eval.sh --prepare [--wheels]
# copies wiki.test.tokens into .devdata/ (git-ignored): name `.devdata/wiki.test.tokens` in the run's
# carry. On the device:
#   OUT=/tmp/eval bash scripts/device_eval.sh RUN_DIR [key=value ...]
# e.g. `model.eval_token_chunk=16 eval.batch_size=16 eval.rolling_stride=512`. Results go to
# $OUT/metrics.eval.jsonl (the layout training writes) and $OUT/eval.txt; the record is printed.
# lm-eval, datasets and omegaconf must be importable; when they are not and .whl/ holds wheels
# (carry .whl), they are installed from there without network. `--wheels` fills .whl/ (~15 MB)
# for the device's Python 3.12 with what its image lacks (it has pandas, pyarrow, scikit-learn,
# sacrebleu, huggingface_hub, lxml, aiohttp; seen 2026-11-23).
set -euo pipefail
cd "$(dirname "$0")/.."
WIKITEXT_SOURCE="${WIKITEXT_SOURCE:-/work/shared/data/wikitext-2/wiki.test.tokens}"
WIKITEXT="${ATTAMBA_WIKITEXT_PATH:-.devdata/wiki.test.tokens}"
PYTHON="${PYTHON:-python3}"

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$(dirname "$WIKITEXT")"
  cp "$WIKITEXT_SOURCE" "$WIKITEXT"
  echo "copied $WIKITEXT_SOURCE -> $WIKITEXT; carry it: .devdata/wiki.test.tokens"
  if [[ "${2:-}" == "--wheels" ]]; then
    tmp="$(mktemp -d)"
    # These publish no wheels: build pure-Python ones here.
    pip wheel -q --no-deps sqlitedict word2number rouge-score "antlr4-python3-runtime==4.9.3" -w "$tmp"
    pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --find-links "$tmp" \
      "lm-eval>=0.4,<0.5" datasets omegaconf -d "$tmp"
    mkdir -p .whl
    # Skip the large packages the device image already holds.
    find "$tmp" -name '*.whl' -size -10M ! -name 'pyarrow*' ! -name 'pandas*' ! -name 'numpy*' \
      ! -name 'scipy*' ! -name 'scikit_learn*' ! -name 'lxml*' ! -name 'hf_xet*' -exec cp {} .whl/ \;
    cp "$tmp"/lm_eval-*.whl .whl/
    echo "wheels in .whl/ ($(du -sh .whl | cut -f1)); carry .whl"
  fi
  exit 0
fi
if [[ $# -lt 1 ]]; then
  echo "usage: bash scripts/device_eval.sh --prepare | RUN_DIR_OR_CKPT [key=value ...]" >&2
  exit 2
fi
ckpt="$1"
shift
if [[ ! -f "$WIKITEXT" ]]; then
  echo "WikiText-2 not found at $WIKITEXT: run 'bash scripts/device_eval.sh --prepare' here and carry .devdata/wiki.test.tokens" >&2
  exit 1
fi
if ! "$PYTHON" -c "import lm_eval, datasets, omegaconf" 2>/dev/null; then
  if [[ -d .whl ]]; then
    "$PYTHON" -m pip install -q --no-index --find-links .whl "lm-eval>=0.4,<0.5" datasets omegaconf
  else
    echo "lm-eval is not installed and no .whl/ folder of wheels was carried" >&2
    exit 1
  fi
fi

OUT="${OUT:-/tmp/device_eval}"
mkdir -p "$OUT"
# Everything is local: keep the HF libraries from trying the network.
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true; date -u; } > "$OUT/eval.txt"
"$PYTHON" -m apps.attamba.eval ckpt="$ckpt" dump_dir="$OUT" eval.tasks='[wikitext_local]' \
  eval.wikitext_path="$WIKITEXT" "$@" >> "$OUT/eval.txt" 2>&1 || { tail -40 "$OUT/eval.txt"; exit 1; }
tail -1 "$OUT/metrics.eval.jsonl"
