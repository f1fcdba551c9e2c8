#!/usr/bin/env bash
# Debian's headless Chromium and its WebDriver, for the playground's browser test.
#
# Usage: scripts/setup_chromium.sh
#   Installs the Debian packages chromium and chromium-driver with apt-get when /usr/bin/chromium
#   or /usr/bin/chromedriver is missing, as root or through sudo. Without either (or without
#   apt-get) it says so and exits 0: the browser test then skips with that reason, and the rest
#   of the suite runs. Idempotent: nothing is done when both are present.
set -euo pipefail

have_all() { [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; }

if have_all; then
    exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null || ! sudo -n true 2>/dev/null; then
        echo "setup_chromium: not root and no password-less sudo: skipping chromium (the browser test will skip)" >&2
        exit 0
    fi
    SUDO="sudo -n"
fi
if ! command -v apt-get >/dev/null; then
    echo "setup_chromium: no apt-get: install chromium and its chromedriver yourself (the browser test will skip)" >&2
    exit 0
fi
echo "setup_chromium: installing Debian packages chromium chromium-driver" >&2
if ! { $SUDO apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; }; then
    echo "setup_chromium: apt-get could not install chromium chromium-driver (the browser test will skip)" >&2
    exit 0
fi
have_all || { echo "setup_chromium: /usr/bin/chromium or /usr/bin/chromedriver still missing after apt-get" >&2; exit 1; }
echo "setup_chromium: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) ready"
