#!/usr/bin/env bash
# Installs moebench and what its offline defaults need, on a fresh Debian/Ubuntu machine or any
# machine with Python >= 3.10. Safe to rerun. Fashion-MNIST comes from Debian's dataset package;
# elsewhere, point MOEBENCH_FASHION_MNIST at a folder holding the four *-ubyte.gz files.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${MOEBENCH_FASHION_MNIST:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "setup: Fashion-MNIST not found; install Debian's dataset-fashion-mnist or set MOEBENCH_FASHION_MNIST" >&2
  fi
fi

python3 -m pip install -q -e ".[dev]"
