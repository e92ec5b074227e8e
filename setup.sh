#!/usr/bin/env bash
# Set up clf on a Debian-like machine: the Fashion-MNIST package, Chromium for the review page's tests, a .venv,
# the project and its test tools.
# Idempotent: run it again to pick up changed dependencies.
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian's packages: Fashion-MNIST's four idx files, and the browser the review page's tests drive (Chromium and
# its driver, headless; nothing is downloaded at run time).
missing=()
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || missing+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    as_root apt-get update -qq
    as_root apt-get install -y -qq "${missing[@]}"
fi
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    as_root apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
