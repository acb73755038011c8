#!/bin/sh
# Make `prometheus` and `promtool` available (Debian package "prometheus"), for
# tests/test_deploy.py and tests/integration/test_prometheus_scrape.py.
# Prints the directory holding both binaries on stdout; exits non-zero if they
# are missing and cannot be installed (not root, no apt-get, no network).
# Never starts a service: the package's init script is not run in containers
# without an init system, and the tests start their own server.
set -eu

for dir in "${PROMETHEUS_BIN_DIR:-}" /usr/bin /usr/local/bin; do
    if [ -n "$dir" ] && [ -x "$dir/promtool" ] && [ -x "$dir/prometheus" ]; then
        echo "$dir"
        exit 0
    fi
done

if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-prometheus: promtool/prometheus missing; install the Debian package 'prometheus' (as root: apt-get install -y prometheus) or set PROMETHEUS_BIN_DIR" >&2
    exit 1
fi

{
    apt-get update -qq
    # policy-rc.d exit 101: do not start the packaged service while installing
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
} >&2

command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1
dirname "$(command -v promtool)"
