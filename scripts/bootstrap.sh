#!/usr/bin/env bash
# Sets up everything this project needs on a fresh Debian/Ubuntu machine: a virtual environment in .venv
# with the project and its CPU extra; with --test also the test extra and the system packages tests use.
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1

# Only the test suite needs system packages: a CJK font to render OCR test images, nginx for the search
# front, Debian's Chromium for the web add-on, Redis for the library's Celery tests. Running the services needs none.
APT_PACKAGES=()
((WITH_TEST)) && APT_PACKAGES=(fonts-wqy-zenhei nginx-light chromium chromium-driver redis-server)

missing=()
for pkg in "${APT_PACKAGES[@]+"${APT_PACKAGES[@]}"}"; do
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
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    # Debian's python3 ships venv/ensurepip separately.
    rm -rf .venv
    if [[ $(id -u) -eq 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
    elif command -v sudo >/dev/null; then
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
    else
      echo "bootstrap: '$PYTHON -m venv' failed; install python3-venv" >&2
      exit 1
    fi
    "$PYTHON" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
fi

extras="cpu,library"
((WITH_TEST)) && extras="cpu,library,test"
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)-$extras"
if [[ ! -f "$stamp" ]]; then
  echo "bootstrap: installing the project with extras [$extras]"
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
