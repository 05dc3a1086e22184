#!/usr/bin/env bash
# The one test command: installs what the tests need and runs them all.
# As root it installs the real components from Debian when missing; CI=true makes every
# test that needs a tool fail instead of skip when the tool is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    need=()
    command -v prometheus >/dev/null || need+=(prometheus)
    command -v promtool >/dev/null || need+=(prometheus)
    command -v prometheus-alertmanager >/dev/null || need+=(prometheus-alertmanager)
    command -v ip >/dev/null || need+=(iproute2)
    command -v podman >/dev/null || need+=(podman)
    command -v runc >/dev/null || need+=(runc)
    command -v nft >/dev/null || need+=(nftables)
    command -v sysctl >/dev/null || need+=(procps)
    command -v iptables >/dev/null || need+=(iptables)
    command -v setpriv >/dev/null || need+=(util-linux)
    command -v nsenter >/dev/null || need+=(util-linux)
    command -v kubectl >/dev/null || need+=(kubernetes-client)
    command -v systemd-analyze >/dev/null || need+=(systemd)
    command -v ufw >/dev/null || need+=(ufw)
    command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
    command -v jsonnet >/dev/null || need+=(jsonnet)
    if [ ${#need[@]} -gt 0 ]; then
        echo "run.sh: installing from Debian: ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi

python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .

set +e
.venv/bin/pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "run.sh: pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit $rc
