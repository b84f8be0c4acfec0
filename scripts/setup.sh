#!/usr/bin/env bash
# Set up rawwave on a fresh Debian/Ubuntu machine: system packages, a virtualenv with rawwave in it,
# and the default model exported to ONNX. Safe to re-run: it installs only what is missing.
#   bash scripts/setup.sh        # to run rawwave (redis-server, the package + export extra, the model)
#   bash scripts/setup.sh dev    # to test it too (espeak-ng, chromium, ffmpeg, test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

apt_packages=(redis-server)
if [ "$mode" = dev ]; then
  apt_packages+=(espeak-ng libespeak-ng1 flite sox ffmpeg chromium docker-compose wamerican fortunes wordnet-base)
fi

missing=()
for package in "${apt_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
extras=export
[ "$mode" = dev ] && extras=export,dev
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -c "import rawwave, torch, onnxruntime" # fail loudly if the install did not take

if [ -f checkpoints/default/config.json ]; then
  .venv/bin/rawwave export checkpoints/default --out models/default
fi
