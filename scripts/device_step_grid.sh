#!/usr/bin/env bash
# Device-machine training-step times (benchmarks/profile_step.py, no profiler) over a grid of
# model, sequence length, compile mode and Attamba ssm_impl, with the tokens per step fixed at 16k
# (batch = 16384 / n). Each run has its own time limit, so one slow compile costs that row only;
# the table is printed last, then Attamba's tokens/s relative to the transformer's (medians over
# repeats), and both are kept in $OUT/step_grid.txt.
#
#   OUT=/tmp/grid GRID="attamba:1024:reduce-overhead:triton transformer:1024:reduce-overhead" \
#       bash scripts/device_step_grid.sh
# Entries are model:n[:compile_mode[:ssm_impl]]; RUN_TIMEOUT (default 200 s) caps each run;
# STEP_ARGS (e.g. --eager-loss) go to every profile_step.py run.
# REPEATS=k runs the whole grid k times, interleaved (A B A B, not A A B B), so that drift of the
# machine shows as spread within each entry instead of as a difference between entries.
set -u
OUT="${OUT:-/tmp/device_step_grid}"
GRID="${GRID:-transformer:1024:reduce-overhead attamba:1024:reduce-overhead:triton attamba:1024:reduce-overhead:triton_window}"
source "$(dirname "$0")/device_env.sh"
rows=()
for round in $(seq "${REPEATS:-1}"); do
  for entry in $GRID; do
    IFS=: read -r model n mode impl <<< "$entry"
    mode=${mode:-default}
    if [ "$model" = transformer ]; then config=apps/main/configs/transformer_60m.yaml; extra=""
    else config=apps/attamba/configs/attamba_60m.yaml; extra=${impl:+model.ssm_impl=$impl}; fi
    log="$OUT/${model}_${n}_${mode}${impl:+_$impl}_$round.log"
    timeout -k 10 "${RUN_TIMEOUT:-200}" python benchmarks/profile_step.py config=$config --seq-len "$n" \
      --batch $((16384 / n)) --mean-doc 512 --profile-steps 0 ${STEP_ARGS:-} distributed.compile_mode=$mode $extra > "$log" 2>&1
    code=$?
    result=$(grep -o "[0-9.]* ms/step, [0-9,]* tok/s" "$log" | tail -1)
    rows+=("$(printf '%-12s %6s %-16s %-14s %s' "$model" "$n" "$mode" "${impl:--}" "${result:-failed (exit $code, see $log)}")")
    echo "${rows[-1]}"
  done
done
{ echo; printf '%-12s %6s %-16s %-14s %s\n' model n compile_mode ssm_impl result; printf '%s\n' "${rows[@]}"; } | tee "$OUT/step_grid.txt"
# Attamba's tokens/s over the transformer's, per n, compile mode and ssm_impl, from median step times.
printf '%s\n' "${rows[@]}" | python3 -c '
import collections, re, statistics, sys
times = collections.defaultdict(list)
for line in sys.stdin:
    fields, match = line.split(), re.search(r"([0-9.]+) ms/step", line)
    if match:
        model, n, mode, impl = fields[:4]
        times[(int(n), mode, model, impl)].append(float(match.group(1)))
for (n, mode, model, impl), values in sorted(times.items()):
    other = times.get((n, mode, "transformer", "-"))
    if model == "attamba" and other:
        ratio = statistics.median(other) / statistics.median(values)
        print(f"n={n} {mode} ssm_impl={impl}: Attamba {statistics.median(values):.2f} ms, transformer "
              f"{statistics.median(other):.2f} ms (medians) -> {ratio:.3f}x the transformer tokens/s")
' | tee -a "$OUT/step_grid.txt"
