#!/usr/bin/env bash
# Installs the Debian packages gradlora needs, only those that are missing.
# Idempotent: runs `apt-get update` only when something has to be installed.
set -euo pipefail
pkgs=(cmake g++ make libtorch-dev libfmt-dev libspdlog-dev libyaml-cpp-dev libgtest-dev
      libgmock-dev libbenchmark-dev libcli11-dev libgloo-dev libopenblas0-pthread
      nlohmann-json3-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
