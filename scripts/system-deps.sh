#!/usr/bin/env bash
# Debian packages the test suite needs (a browser for the dashboard test, redis-server and PostgreSQL
# binaries for the fault suite's throwaway servers, wrk and hey for load benchmarks). Installs only what is
# missing, so a prepared machine pays nothing.
set -euo pipefail
PACKAGES=(
  "redis-server:redis-server"
  "postgresql:initdb"
  "wrk:wrk"
  "hey:hey"
  "chromium:chromium"
  "docker-compose:docker-compose"
)
missing=()
for entry in "${PACKAGES[@]}"; do
  pkg=${entry%%:*}; probe=${entry#*:}
  if ! command -v "$probe" >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/"$probe" >/dev/null 2>&1; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
