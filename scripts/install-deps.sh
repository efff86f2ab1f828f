#!/usr/bin/env bash
# Installs every Debian package that nibble's build and tests need. Idempotent; skips apt when all are present.
set -euo pipefail
packages=(
    build-essential cmake ninja-build ccache pkg-config git
    nlohmann-json3-dev libcpp-httplib-dev libcli11-dev libyaml-cpp-dev libfmt-dev libspdlog-dev
    libpcre2-dev libicu-dev libxxhash-dev libgtest-dev libgmock-dev libbenchmark-dev
    clang libclang-rt-dev
    python3 python3-jinja2 python3-numpy
    nodejs
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Debian splits npm from nodejs; NodeSource's nodejs carries npm itself.
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
