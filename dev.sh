#!/usr/bin/env bash
# Developer entry point: `./dev.sh run` sets up and runs linewarden on embedded
# defaults; `./dev.sh test` sets up and runs the test suite. Both are idempotent.
set -euo pipefail
cd "$(dirname "$0")"
here=$PWD
want=$(tr -d ' \n' < .python-version)

find_python() {
  # pyenv keeps interpreters under ~/.pyenv/versions/X.Y.Z; .python-version pins X.Y.
  local c
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want"*/bin/python3 \
           "$(command -v "python$want" 2>/dev/null || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  echo "dev.sh: no Python $want found (looked in ~/.pyenv/versions and PATH);" \
       "install it with 'pyenv install $want' or your package manager" >&2
  return 1
}

apt_install() {
  # Debian packages the end-to-end tests and benchmarks drive; only as root, only when missing.
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "dev.sh: missing Debian packages (${missing[*]}); e2e tests needing them will skip" >&2
    return 0
  fi
  echo "dev.sh: apt-get install ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup() {
  local py stamp
  py=$(find_python)
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))"; then
    rm -rf .venv
    "$py" -m venv .venv
  fi
  # The compiled HTML scanner (rules/_htmlscan.c) is built at install: a C compiler is
  # needed for it (without one the install goes on and the Engine uses its Python path).
  command -v cc >/dev/null 2>&1 || apt_install gcc libc6-dev
  stamp=.venv/.installed-$(cat pyproject.toml rules/*.c proxy/*.c proxy/*.h storage/*.c | sha256sum | cut -c1-16)
  if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[test]"
    touch "$stamp"
  fi
}

case "${1:-}" in
  run)
    shift
    setup
    exec .venv/bin/linewarden run "$@"
    ;;
  test)
    shift
    apt_install iproute2 nftables dnsmasq tcpdump openssl dnsperf unbound sqlite3
    setup
    exec .venv/bin/python -m pytest -q "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: ./dev.sh run [linewarden run flags] | ./dev.sh test [pytest args] | ./dev.sh setup" >&2
    exit 2
    ;;
esac
