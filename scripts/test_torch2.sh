#!/usr/bin/env bash
# Runs the README's test command (scripts/test.sh) against LibTorch 2.x: inside a minimal
# Debian 13 "trixie" root (LibTorch 2.6.0), made with debootstrap, with a clean copy of this
# working tree (tracked files and untracked ones git does not ignore).
#
# The root is kept between runs (default /var/cache/gradlora/trixie, or $GRADLORA_TORCH2_ROOT)
# and rebuilt when it is missing or broken; the build folder inside it is kept too, so a second
# run only recompiles what changed. Needs root (or sudo) for debootstrap, mount and chroot.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
ROOT="${GRADLORA_TORCH2_ROOT:-/var/cache/gradlora/trixie}"
SUITE="${GRADLORA_TORCH2_SUITE:-trixie}"
MIRROR="${GRADLORA_TORCH2_MIRROR:-http://deb.debian.org/debian}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
say() { echo "test_torch2: $*" >&2; }
fail() {
  say "FAILED on LibTorch 2.x (Debian ${SUITE} root ${ROOT}): $*"
  exit 1
}

if ! command -v debootstrap >/dev/null 2>&1; then
  say "installing debootstrap"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do $SUDO umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT

root_ok() { [ -f "$ROOT/.gradlora-root" ] && $SUDO chroot "$ROOT" /bin/true 2>/dev/null; }

if ! root_ok; then
  say "creating the ${SUITE} root in ${ROOT} (debootstrap --variant=minbase)"
  $SUDO rm -rf "$ROOT.new"
  $SUDO mkdir -p "$(dirname "$ROOT")"
  $SUDO debootstrap --variant=minbase "$SUITE" "$ROOT.new" "$MIRROR" >"/tmp/gradlora-debootstrap.log" 2>&1 ||
    { tail -20 /tmp/gradlora-debootstrap.log >&2; fail "debootstrap failed (log: /tmp/gradlora-debootstrap.log)"; }
  echo "$SUITE" | $SUDO tee "$ROOT.new/.gradlora-root" >/dev/null
  $SUDO rm -rf "$ROOT"
  $SUDO mv "$ROOT.new" "$ROOT"
fi

for m in proc dev dev/shm; do
  mountpoint -q "$ROOT/$m" && $SUDO umount -l "$ROOT/$m"
done
$SUDO mount -t proc proc "$ROOT/proc" && mounted+=("$ROOT/proc")
$SUDO mount --bind /dev "$ROOT/dev" && mounted+=("$ROOT/dev")
$SUDO mount -t tmpfs tmpfs "$ROOT/dev/shm" && mounted+=("$ROOT/dev/shm")
$SUDO cp /etc/resolv.conf "$ROOT/etc/resolv.conf"

# A clean copy of the working tree: staged whole, then synchronised by content into the
# kept copy. A file whose bytes changed is written anew (so its time is now and the kept
# build folder rebuilds what depends on it); an unchanged file keeps its old time; a file
# that is gone from the tree is removed. (Copying times from the tree instead would let an
# object built from another tree look newer than a changed source.)
STAGE="$ROOT/src/.gradlora-stage"
$SUDO rm -rf "$STAGE"
$SUDO mkdir -p "$STAGE" "$ROOT/src/gradlora"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null --no-recursion -T - -cf -) | $SUDO tar -xf - -C "$STAGE"
(cd "$STAGE" && find . -type f -print0) | while IFS= read -r -d '' f; do
  dst="$ROOT/src/gradlora/$f"
  if ! cmp -s "$STAGE/$f" "$dst"; then
    $SUDO mkdir -p "$(dirname "$dst")"
    $SUDO cp "$STAGE/$f" "$dst" && $SUDO touch "$dst"
  fi
done
(cd "$ROOT/src/gradlora" && find . -type f -print0) | while IFS= read -r -d '' f; do
  [ -e "$STAGE/$f" ] || $SUDO rm -f "$ROOT/src/gradlora/$f"
done
$SUDO rm -rf "$STAGE"

say "running scripts/test.sh inside the ${SUITE} root"
set +e
$SUDO chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 CI="${CI:-}" BUILD_DIR=/build/gradlora \
  /bin/bash -c 'cd /src/gradlora && scripts/setup.sh && \
    echo "test_torch2: LibTorch $(dpkg-query -W -f="\${Version}" libtorch-dev) on Debian $(cat /etc/debian_version)" >&2 && \
    scripts/test.sh'
status=$?
set -e
[ "$status" -eq 0 ] || fail "scripts/test.sh exited with status $status"
say "passed on LibTorch 2.x (Debian ${SUITE})"
