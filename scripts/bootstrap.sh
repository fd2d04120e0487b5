#!/usr/bin/env bash
# Sets up everything this project needs on a fresh Debian/Ubuntu machine: system packages the tests
# use, a virtual environment in .venv, and the project with its CPU extra (+ test extra with --test).
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1

APT_PACKAGES=(fonts-wqy-zenhei nginx-light chromium chromium-driver)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="none"; fi
  if [[ "$SUDO" == "none" ]]; then
    echo "bootstrap: please install: ${missing[*]} (apt-get install ${missing[*]})" >&2
  else
    echo "bootstrap: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

extras="cpu"
((WITH_TEST)) && extras="cpu,test"
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)-$extras"
if [[ ! -f "$stamp" ]]; then
  echo "bootstrap: installing the project with extras [$extras]"
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
