#!/usr/bin/env bash
# Launch (or relaunch after a preemption) the TL;DR pipeline on every worker of a TPU VM set up by
# scripts/tpu_vm_setup.sh. Checkpoints go to $OUT (gs://...), so a relaunch continues where the last
# checkpoint left off: the command always passes --resume (a fresh --out simply starts from scratch).
#
#   TPU_NAME=jaxrlhf-tldr ZONE=us-central2-b OUT=gs://my-bucket/tldr-gpt2 scripts/launch_tldr_tpu.sh
#   MODEL=gpt2-large FSDP=4 OUT=gs://my-bucket/tldr-large scripts/launch_tldr_tpu.sh --rl.kl_target 6
#   scripts/launch_tldr_tpu.sh --logs       # tail the log of worker 0
#
# Extra arguments are passed to `python -m experiments.tldr` (every config field is a flag: --help).
set -euo pipefail

TPU_NAME="${TPU_NAME:-jaxrlhf-tldr}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
REMOTE_DIR="${REMOTE_DIR:-jaxrlhf}"
MODEL="${MODEL:-gpt2}"
FSDP="${FSDP:-1}"             # size of the mesh's fsdp axis; e.g. 4 for gpt2-large / gpt2-xl on v4-8
OUT="${OUT:?set OUT=gs://bucket/run (checkpoints, metrics and samples go there)}"
tpu=(gcloud compute tpus tpu-vm --project "$PROJECT" --zone "$ZONE")

if [[ "${1:-}" == "--logs" ]]; then
  exec "${tpu[@]}" ssh "$TPU_NAME" --worker=0 --command "tail -f ~/tldr.log"
fi

# One process per worker; on a multi-host slice --multihost lets them find each other.
workers="$("${tpu[@]}" describe "$TPU_NAME" --format='value(networkEndpoints[].ipAddress)' | tr ';' '\n' | grep -c .)"
multihost=()
[[ "$workers" -gt 1 ]] && multihost=(--multihost)
args=(--model "$MODEL" --out "$OUT" --mesh-fsdp "$FSDP" --bf16 --resume "${multihost[@]}" --progress false "$@")
printf -v quoted '%q ' "${args[@]}"
echo "== $TPU_NAME: $workers worker(s): python -m experiments.tldr $quoted"
"${tpu[@]}" ssh "$TPU_NAME" --worker=all --command "
  cd ~/$REMOTE_DIR && source ~/venv/bin/activate
  if [[ -f ~/tldr.pid ]]; then kill \$(cat ~/tldr.pid) 2>/dev/null || true; sleep 5; fi  # an earlier launch
  nohup python -m experiments.tldr $quoted > ~/tldr.log 2>&1 &
  echo \$! > ~/tldr.pid
  echo \"worker \$(hostname): started pid \$(cat ~/tldr.pid), log ~/tldr.log\"
"
