#!/usr/bin/env bash
# Install the toolchains gncodegen's firmware targets and strict-flag tests use, on Debian or
# Ubuntu: the Arm bare-metal compiler with newlib, QEMU for Arm system and user mode, the AArch64
# Linux cross compiler with its C library, the RISC-V bare-metal compiler with picolibc and QEMU
# for RISC-V, the s390x cross compiler (a target that evaluates float arithmetic in double),
# clang, valgrind, make and cmake for the generated firmware projects, and a headless Chromium
# that opens the code-generation report as a user's browser would.
#
# Idempotent: installs only the packages that are missing (apt-get update runs only then) and
# prints nothing when everything is already there. Run as root, or with sudo available.
#
#   scripts/install-toolchains.sh           install what is missing
#   scripts/install-toolchains.sh --check   list what is missing and exit 1, install nothing
set -euo pipefail

PACKAGES=(
    gcc g++ make cmake
    gcc-arm-none-eabi binutils-arm-none-eabi libnewlib-arm-none-eabi
    qemu-system-arm qemu-user
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf qemu-system-misc
    gcc-s390x-linux-gnu libc6-dev-s390x-cross
    clang
    valgrind
    chromium
)
# Commands the tests run; each must exist once the packages are in.
COMMANDS=(
    gcc g++ make cmake arm-none-eabi-gcc arm-none-eabi-size arm-none-eabi-nm qemu-system-arm
    qemu-aarch64 aarch64-linux-gnu-gcc riscv64-unknown-elf-gcc qemu-system-riscv32
    s390x-linux-gnu-gcc clang valgrind chromium
)

fail() {
    echo "install-toolchains: $*" >&2
    exit 1
}

missing=()
for package in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$package")
    fi
done

if [[ "${1:-}" == "--check" ]]; then
    if (( ${#missing[@]} )); then
        echo "install-toolchains: missing packages: ${missing[*]}" >&2
        exit 1
    fi
    exit 0
elif [[ $# -gt 0 ]]; then
    fail "unknown argument '$1' (usage: $0 [--check])"
fi

if (( ${#missing[@]} )); then
    command -v apt-get >/dev/null || fail "apt-get not found: install ${missing[*]} by hand"
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || fail "not root and no sudo: cannot install ${missing[*]}"
        sudo=(sudo -n)
    fi
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -q -o DPkg::Lock::Timeout=600)
    if ! { "${sudo[@]}" "${apt[@]}" update && \
           "${sudo[@]}" "${apt[@]}" install -y --no-install-recommends "${missing[@]}"; } \
           >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        fail "apt-get failed to install: ${missing[*]}"
    fi
fi

for cmd in "${COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null || fail "'$cmd' is still not on PATH after installing"
done
