#!/usr/bin/env bash
# Build .venv with the pinned SGLang release and what it needs.
# CPU machine: CPU torch, sglang with --no-deps, and the explicit pinned dependency list.
# NVIDIA machine: sglang with its own (CUDA) dependency list.
# Usage: scripts/setup_venv.sh [VENV_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
# shellcheck disable=SC1091
source <(grep -E '^[A-Z0-9_]+=' "$here/sglang.pin")
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
wheel_dir="$here/.cache/wheels"
mkdir -p "$wheel_dir"

# The SGLang wheel, kept in .cache/wheels (the patch tool reads stock bytes from it) and checked
# against the pinned sha256 before anything is installed.
wheel="$wheel_dir/${SGLANG_WHEEL}"
if [ ! -f "$wheel" ] || ! echo "${SGLANG_WHEEL_SHA256}  $wheel" | sha256sum -c --quiet - 2>/dev/null; then
  "${pip[@]}" download --no-deps -d "$wheel_dir" "sglang==${SGLANG_VERSION}"
fi
echo "${SGLANG_WHEEL_SHA256}  $wheel" | sha256sum -c --quiet - || {
  echo "[setup] $wheel does not match the pinned sha256 (sglang.pin)" >&2
  exit 1
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing sglang==${SGLANG_VERSION} with its GPU dependencies"
  "${pip[@]}" install "$wheel"
else
  echo "[setup] no GPU: CPU torch ${TORCH_CPU_VERSION}, sglang ${SGLANG_VERSION} --no-deps, pinned CPU dependency list"
  constraints="$wheel_dir/constraints.txt"
  { echo "torch==${TORCH_CPU_VERSION}"; cat "$here/requirements/cpu-constraints.txt"; } >"$constraints"
  "${pip[@]}" install "torch==${TORCH_CPU_VERSION}" -c "$constraints"
  "${pip[@]}" install --no-deps "$wheel"
  "${pip[@]}" install -r "$here/requirements/cpu.txt" -c "$constraints"
fi
"${pip[@]}" install -r "$here/requirements/dev.txt"
# Optional: the gateway (smg) wheel ships a Linux x86-64/arm64 binary
if ! "${pip[@]}" install -r "$here/requirements/gateway.txt"; then
  echo "[setup] smg (SGLang's model gateway) did not install: the gateway tests will be skipped" >&2
fi
"${pip[@]}" install --no-deps -e "$here"
echo "[setup] done: $venv"
