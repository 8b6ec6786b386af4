#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine to build the C library: the system's -dev packages (installed with
# apt-get when missing and run as root) and ONNX Runtime's C headers, taken from Debian trixie's
# libonnxruntime-dev .deb. That .deb is fetched with a private apt configuration under $1 (the
# system's apt sources and state are not touched) and only its headers are extracted into $1/include.
set -euo pipefail
out=${1:?usage: setup.sh BUILD_DIR}
ORT_DEB=libonnxruntime-dev
DEV_PACKAGES=(libpng-dev libjpeg-dev libjansson-dev libssl-dev)

missing=()
for p in "${DEV_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "setup.sh: missing packages ${missing[*]}: run 'apt-get install ${missing[*]}' as root" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -f "$out/include/onnxruntime_c_api.h" ]]; then
  apt_dir="$out/apt"
  mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/deb"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    > "$apt_dir/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$(realpath "$apt_dir/sources.list")" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State=$(realpath "$apt_dir/state")" -o "Dir::Cache=$(realpath "$apt_dir/cache")"
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root -qq)
  apt-get "${apt_opts[@]}" update
  (cd "$apt_dir/deb" && apt-get "${apt_opts[@]}" download "$ORT_DEB")
  dpkg-deb -x "$apt_dir"/deb/${ORT_DEB}_*.deb "$apt_dir/root"
  mkdir -p "$out/include"
  cp "$apt_dir"/root/usr/include/onnxruntime/onnxruntime_c_api.h "$out/include/"
  rm -rf "$apt_dir"
fi
