# Sourced by the device scripts, after they set OUT: creates OUT (made absolute), moves to the
# repository root, and puts the carried wheels (.whl: omegaconf, lm-eval and their pure-Python
# dependencies, which the device lacks) on the path. A fresh machine has none of them; a warm one
# has them already, and the install is skipped.
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -d .whl ] && ! python -c "import omegaconf, lm_eval" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1 \
    || echo "device_env.sh: installing .whl failed" >&2
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
