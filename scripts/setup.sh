#!/usr/bin/env bash
# Idempotent set-up shared by scripts/demo and scripts/test: Debian packages that
# are missing, a .venv, a cached pyfuse3 wheel (it only ships as an sdist that takes
# ~40 s to compile) and an editable install of kvpfs with its test extras.
# Usage: scripts/setup.sh [--test]   (--test adds what the test suite drives)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pkgs=(fuse3 libfuse3-dev pkg-config gcc)
if [ "$want_test" = 1 ]; then
  # Programs the tests drive as real processes, the real peers (cxenstored, the
  # xenstore-* clients, hv_kvp_daemon) and what builds the cxenstored test shim.
  pkgs+=(vim nano emacs-nox tmux attr util-linux procps xenstore-utils xen-utils-4.17 libxen-dev hyperv-daemons)
fi
python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then pkgs+=(python3); python=python3; fi
if command -v "$python" >/dev/null 2>&1; then
  "$python" -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)
  inc=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
  [ -n "$inc" ] && [ -f "$inc/Python.h" ] || pkgs+=(python3-dev)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
py=.venv/bin/python

mkdir -p .cache/wheels
if ! ls .cache/wheels/pyfuse3-*.whl >/dev/null 2>&1; then
  echo "setup: building the pyfuse3 wheel once (cached in .cache/wheels)" >&2
  "$py" -m pip install -q --upgrade pip wheel >/dev/null
  "$py" -m pip wheel -q --no-deps 'pyfuse3==3.5.0' -w .cache/wheels
fi

stamp=.cache/install.stamp
digest=$(cat pyproject.toml .cache/wheels/pyfuse3-*.whl | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  "$py" -m pip install -q --no-deps .cache/wheels/pyfuse3-*.whl
  "$py" -m pip install -q -e '.[test]'
  echo "$digest" > "$stamp"
fi

# Byte-compile kvpfs: with PYTHONDONTWRITEBYTECODE set (common in CI images) every
# start would otherwise compile the sources again, a third of the start-up time.
"$py" -m compileall -q kvpfs >/dev/null

if [ "$want_test" = 1 ]; then
  # Debian's cloud-init and waagent are the real peers of the pool files; they are
  # not on PyPI, so their packages are extracted (never installed) under .cache/peers.
  mkdir -p .cache/peers
  for deb in cloud-init waagent; do
    if [ ! -d ".cache/peers/$deb" ]; then
      tmp=$(mktemp -d)
      if (cd "$tmp" && apt-get download -qq "$deb" >/dev/null 2>&1); then
        dpkg-deb -x "$tmp"/*.deb ".cache/peers/$deb"
      else
        echo "setup: could not download the $deb package; its interop tests will skip" >&2
      fi
      rm -rf "$tmp"
    fi
  done
fi
