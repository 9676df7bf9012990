#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install fedbgmd with what it needs.
# Sourced by .ci/main and .ci/run; safe to run again (re-installs only when pyproject.toml changed).
set -euo pipefail
FEDBGMD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDBGMD_VENV:-$FEDBGMD_ROOT/.venv}"
PY="${PYTHON:-python3}"

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "fedbgmd: $PY not found; install Python 3.10+ (Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "fedbgmd: needs Python >= 3.10, found $("$PY" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "fedbgmd: creating virtual environment $VENV"
  if ! "$PY" -m venv "$VENV"; then
    echo "fedbgmd: 'python3 -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
    exit 1
  fi
fi
# torch and torchvision must be a matching pair; override with FEDBGMD_TORCH if needed.
case "$(uname -m)" in
  aarch64|arm64) default_torch="torch==2.9.1 torchvision==0.24.1" ;;
  *) default_torch="torch==2.14.1 torchvision==0.29.1" ;;
esac
TORCH_SPEC="${FEDBGMD_TORCH:-$default_torch}"
stamp="$VENV/.fedbgmd-install"
want="$(cat "$FEDBGMD_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  # The default x86-64 pair is a CUDA build: ~6 GB in the venv. Say so before pip fills the disk
  # half way (FEDBGMD_MIN_FREE_GB=0 skips the check, e.g. for a CPU-only FEDBGMD_TORCH).
  need_gb="${FEDBGMD_MIN_FREE_GB:-$([ "$TORCH_SPEC" = "torch==2.14.1 torchvision==0.29.1" ] && echo 7 || echo 2)}"
  free_kb="$(df -Pk "$VENV" 2>/dev/null | awk 'NR == 2 {print $4}')"
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
    echo "fedbgmd: only $((free_kb / 1024)) MB free where $VENV lies; installing $TORCH_SPEC and the" \
      "rest needs about $need_gb GB. Free some space, or put the venv elsewhere with FEDBGMD_VENV=..." >&2
    exit 1
  fi
  echo "fedbgmd: installing dependencies into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC
  "$VENV/bin/python" -m pip install -q -e "$FEDBGMD_ROOT[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"

# Fashion-MNIST offline from Debian's package (best effort; the CLI says where it looked if absent).
ensure_fashion_mnist() {
  [ -d /usr/share/datasets/fashion-mnist ] && return 0
  command -v apt-get >/dev/null 2>&1 || return 1
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  { $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } || return 1
  [ -d /usr/share/datasets/fashion-mnist ]
}
