#!/usr/bin/env bash
# Each lever alone on top of the faithful recipe (issue 12's ablation), one run per lever, in parallel.
#
#     bash benchmarks/lever_ablation.sh PRESET DONOR_RUN [JOBS]
#
# PRESET: the faithful preset (e.g. medium). DONOR_RUN: a run folder whose 01-03 are finished with
# PRESET's data and aux settings (a sweep's first run, say); every run takes them over by hard links.
# Runs land in $FLOWSAN_OUTPUTS (default outputs/)/ablation-<PRESET>/; compare them with
# `flowsan compare outputs/ablation-<PRESET>/*`. Every run uses the same unseen suite, without the
# pretrained classifiers that the "seen" run puts in J_G.
set -u
cd "$(dirname "$0")/.."
PRESET=${1:?usage: lever_ablation.sh PRESET DONOR_RUN [JOBS]}
DONOR=$(cd "${2:?usage: lever_ablation.sh PRESET DONOR_RUN [JOBS]}" && pwd)
JOBS=${3:-6}
FLOWSAN=${FLOWSAN:-.venv/bin/flowsan}
export FLOWSAN_OUTPUTS=${FLOWSAN_OUTPUTS:-outputs}/ablation-$PRESET
SUITE=(--set 'evaluate.classifiers=["faceapi_gender","cydral_gender","ssrnet_gender"]'
       --set 'evaluate.matchers=["faceapi","hse","mobileface"]' --set san.train_ensemble=false)
LEVERS=(
  "faithful"
  "residual   san.output=\"residual\" san.eps=32.0"
  "centred    san.output=\"residual\" san.eps=32.0 san.center_edit=true"
  "seen       san.seen_classifiers=[\"hse_gender\",\"oarriaga_gender\"]"
  "uniform    san.gender_target=\"uniform\""
  "diversity  san.input_diversity=true"
  "cosine     san.match_distance=\"cosine\""
  "random     san.direction=\"random\""
)
one() {  # one NAME [KEY=VALUE ...]
  local name=$1; shift
  local sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
  mkdir -p "$FLOWSAN_OUTPUTS/logs"
  $FLOWSAN run "$PRESET" --run-name "$name" --set threads=1 "${SUITE[@]}" "${sets[@]}" --reuse-from "$DONOR" \
    > "$FLOWSAN_OUTPUTS/logs/$name.log" 2>&1
  echo "$name: exit $?"
}
running=0
for spec in "${LEVERS[@]}"; do
  one $spec &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
