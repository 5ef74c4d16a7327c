#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Install the Debian packages that samepage's build, tests and benchmarks
# need. Idempotent: does nothing when everything is already present, so
# `make demo` and `make check` can call it every time.
set -euo pipefail

pkgs=(build-essential pkg-config clang libxxhash-dev libbsd-dev check gnuplot-nox python3)

missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
	echo "deps: missing packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
	exit 1
fi
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
