#!/usr/bin/env bash
# Run a command on every worker of a TPU VM slice at once (multi-host JAX needs all of them).
#
#   tpu/launch.sh NAME ZONE setup              copy this checkout to every worker, run tpu/setup.sh there
#   tpu/launch.sh NAME ZONE run -- COMMAND...  run COMMAND in the checkout on every worker, venv active
#
# Environment: PROJECT (gcloud project, optional), REMOTE_DIR (default qwen3-jax).
set -euo pipefail

usage() {
  echo "usage: $0 NAME ZONE setup | $0 NAME ZONE run -- COMMAND..." >&2
  exit 2
}

[ "$#" -ge 3 ] || usage
name="$1"
zone="$2"
action="$3"
shift 3
remote_dir="${REMOTE_DIR:-qwen3-jax}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

gcloud_args=(--zone "$zone" --worker=all)
if [ -n "${PROJECT:-}" ]; then
  gcloud_args+=(--project "$PROJECT")
fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --command "$1"
}

case "$action" in
  setup)
    gcloud compute tpus tpu-vm scp --recurse "$here" "$name:~/$remote_dir" "${gcloud_args[@]}"
    on_all_workers "cd ~/$remote_dir && bash tpu/setup.sh"
    ;;
  run)
    [ "${1:-}" = "--" ] && shift
    [ "$#" -ge 1 ] || usage
    printf -v command '%q ' "$@"
    venv="\${QWEN3_JAX_VENV:-\$HOME/qwen3-jax-venv}"
    on_all_workers ". $venv/bin/activate && cd ~/$remote_dir && $command"
    ;;
  *)
    usage
    ;;
esac
