#!/usr/bin/env bash
# Installs moebench into a virtual environment (.venv, unless one is already active) with what its
# offline defaults need. Works with a distribution's own Python, which refuses system-wide pip
# installs (PEP 668). Safe to rerun. Fashion-MNIST comes from Debian's dataset package; elsewhere,
# point MOEBENCH_FASHION_MNIST at a folder holding the four *-ubyte.gz files.
# Afterwards: `source .venv/bin/activate` puts `moebench` on PATH (or call .venv/bin/moebench).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_install() {  # Debian/Ubuntu packages, only where apt-get exists
  command -v apt-get >/dev/null 2>&1 || return 1
  echo "setup: apt-get install $*"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${MOEBENCH_FASHION_MNIST:-}" ]; then
  apt_install dataset-fashion-mnist || echo "setup: Fashion-MNIST not found; install Debian's dataset-fashion-mnist or set MOEBENCH_FASHION_MNIST" >&2
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
  echo "setup: using the active virtual environment $VIRTUAL_ENV"
else
  if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $(command -v python3) ($(python3 --version 2>&1))"
    if ! python3 -m venv .venv; then
      rm -rf .venv
      # Debian/Ubuntu ship venv (and ensurepip) separately, as python3-venv / python3.X-venv.
      ver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      apt_install python3-venv "python${ver}-venv" || apt_install python3-venv
      python3 -m venv .venv
    fi
  fi
  PY=.venv/bin/python
fi

"$PY" -m pip install --upgrade --progress-bar on "pip>=23" | grep -v "^Requirement already satisfied" || true
echo "setup: pip install -e .[dev] (torch and its peers; the first install takes a few minutes)"
"$PY" -m pip install --progress-bar on -e ".[dev]"
echo "setup: done. Activate with: source .venv/bin/activate   (or call .venv/bin/moebench directly)"
