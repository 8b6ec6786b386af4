#!/usr/bin/env bash
# Install the headless browser the review page's test and `make demo-review` drive: Debian's chromium and
# its chromedriver, with apt-get, when missing (as root). Nothing is downloaded by a driver manager.
set -euo pipefail
PACKAGES=(chromium chromium-driver)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
if [[ $(id -u) != 0 ]]; then
  echo "install_browser.sh: missing packages ${missing[*]}: run 'apt-get install ${missing[*]}' as root" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
