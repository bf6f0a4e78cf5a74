#!/usr/bin/env bash
# Installs what building and testing NOVA needs on Debian/Ubuntu, then checks the toolchain.
# Idempotent: packages already present are not reinstalled. Run as root or with sudo.
set -euo pipefail

# System packages the build needs: a C toolchain (crates with C parts) and pkg-config.
# nova-media links FFmpeg through ffmpeg-next (features codec, format, software-scaling,
# software-resampling only, so no libavfilter/libavdevice); its -sys crate runs bindgen,
# which needs libclang. The ffmpeg and sox CLIs are independent peers for tests and benchmarks
# (ffprobe checks what nova-media writes; sox is the resampling baseline).
# The studio (studio/) builds with Node.js and npm; its browser tests drive Debian's chromium
# (no browser is downloaded).
PACKAGES=(
  build-essential pkg-config ca-certificates
  libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev
  clang libclang-dev
  ffmpeg sox
  chromium
)
command -v npm >/dev/null || PACKAGES+=(nodejs npm)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root to install: ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
  fi
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
# The studio: its packages exactly as package-lock.json pins them, then its static files
# (studio/dist), which `nova serve` serves at /.
here="$(cd "$(dirname "$0")/.." && pwd)"
npm ci --prefix "$here/studio" --no-audit --no-fund --loglevel=error
npm --prefix "$here/studio" run build --silent
echo "setup: ready ($(cargo --version), node $(node --version))"
