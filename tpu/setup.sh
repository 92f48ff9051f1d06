#!/usr/bin/env bash
# Set up one TPU VM worker: a virtual environment with jax[tpu] and qwen3-jax.
# Usage: tpu/setup.sh [PACKAGE]   PACKAGE defaults to the checkout this script lives in.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
package="${1:-$here}"
venv="${QWEN3_JAX_VENV:-$HOME/qwen3-jax-venv}"

python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install --upgrade pip
python -m pip install "jax[tpu]" "$package"
python -c 'import jax; print(f"{jax.process_index()=} {jax.local_device_count()=} {jax.device_count()=}")'
echo "ready: . $venv/bin/activate"
