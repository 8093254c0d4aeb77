#!/usr/bin/env bash
# Create a Cloud TPU VM (v4-8 or v5e-8 by default; any slice works), copy this checkout to every worker
# and install it with `pip install -e '.[tpu]'`, then check that JAX sees the TPU cores. Launch the
# TL;DR pipeline afterwards with scripts/launch_tldr_tpu.sh.
#
#   ACCELERATOR=v4-8 ZONE=us-central2-b scripts/tpu_vm_setup.sh
#   ACCELERATOR=v5litepod-8 ZONE=us-west4-a TPU_NAME=tldr-v5e scripts/tpu_vm_setup.sh
#   SPOT=1 ACCELERATOR=v4-32 scripts/tpu_vm_setup.sh      # a multi-host slice, preemptible
#
# Needs: gcloud (authenticated, a project with TPU quota), and a gs:// bucket for checkpoints in the same
# region (created here if BUCKET is set and missing). Every command runs on all workers (--worker=all),
# so multi-host slices (v4-16 and up, v5litepod-16 and up) are set up the same way.
set -euo pipefail

TPU_NAME="${TPU_NAME:-jaxrlhf-tldr}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
case "$ACCELERATOR" in
  v4-*) DEFAULT_ZONE=us-central2-b; DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
  v5litepod-*|v5e-*) DEFAULT_ZONE=us-west4-a; DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p-*) DEFAULT_ZONE=us-east5-a; DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v6e-*) DEFAULT_ZONE=us-east5-b; DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  *) DEFAULT_ZONE=us-central2-b; DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
# gcloud names v5e slices v5litepod-N.
ACCELERATOR="${ACCELERATOR/v5e-/v5litepod-}"
ZONE="${ZONE:-$DEFAULT_ZONE}"
RUNTIME="${RUNTIME:-$DEFAULT_RUNTIME}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
BUCKET="${BUCKET:-}"          # e.g. gs://my-bucket (optional: created in the zone's region if missing)
REMOTE_DIR="${REMOTE_DIR:-jaxrlhf}"
SPOT="${SPOT:-0}"

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
tpu=(gcloud compute tpus tpu-vm --project "$PROJECT" --zone "$ZONE")

echo "== creating $TPU_NAME ($ACCELERATOR, $RUNTIME) in $ZONE"
if ! "${tpu[@]}" describe "$TPU_NAME" >/dev/null 2>&1; then
  extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  "${tpu[@]}" create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${extra[@]}"
else
  echo "   (exists)"
fi

if [[ -n "$BUCKET" ]] && ! gcloud storage buckets describe "$BUCKET" >/dev/null 2>&1; then
  echo "== creating $BUCKET"
  gcloud storage buckets create "$BUCKET" --project "$PROJECT" --location "${ZONE%-*}"
fi

echo "== copying the checkout to every worker"
archive="$(mktemp -t jaxrlhf.XXXXXX.tar.gz)"
trap 'rm -f "$archive"' EXIT
# Tracked and untracked-but-not-ignored files: what is in the working tree, without venvs or runs.
(cd "$repo_root" && git ls-files -z --cached --others --exclude-standard | tar --null -czf "$archive" -T -)
"${tpu[@]}" scp "$archive" "$TPU_NAME:~/jaxrlhf.tar.gz" --worker=all

echo "== installing on every worker"
"${tpu[@]}" ssh "$TPU_NAME" --worker=all --command "
  set -euo pipefail
  rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/jaxrlhf.tar.gz -C ~/$REMOTE_DIR
  sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv >/dev/null
  python3 -m venv ~/venv && source ~/venv/bin/activate
  pip install -q --upgrade pip
  cd ~/$REMOTE_DIR && pip install -q -e '.[tpu]'
  python -c 'import jax; print(jax.process_index(), jax.local_device_count(), \"local TPU devices:\", jax.local_devices()[0].device_kind)'
"
echo "== ready: launch with TPU_NAME=$TPU_NAME ZONE=$ZONE OUT=${BUCKET:-gs://BUCKET}/tldr scripts/launch_tldr_tpu.sh"
