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
    command -v conntrack >/dev/null || need+=(conntrack)
    command -v sysctl >/dev/null || need+=(procps)
    command -v iptables >/dev/null || need+=(iptables)
    command -v setpriv >/dev/null || need+=(util-linux)
    command -v nsenter >/dev/null || need+=(util-linux)
    command -v kubectl >/dev/null || need+=(kubernetes-client)
    command -v systemd-analyze >/dev/null || need+=(systemd)
    command -v ufw >/dev/null || need+=(ufw)
    command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
    command -v jsonnet >/dev/null || need+=(jsonnet)
    # the daemons whose fixes tests/test_daemons.py applies (each runs there as the test's
    # own process in a test namespace, never as the system's service), firewalld (the tests
    # run a private one inside a test namespace, support.Firewalld: it must never filter
    # the host), and the browser of tests/test_landing.py
    daemons=()
    command -v firewalld >/dev/null || daemons+=(firewalld)
    command -v chromium >/dev/null || daemons+=(chromium)
    command -v redis-server >/dev/null || daemons+=(redis-server)
    command -v nginx >/dev/null || daemons+=(nginx)
    [ -x /usr/lib/postgresql/15/bin/postgres ] || daemons+=(postgresql-15)
    command -v mariadbd >/dev/null || daemons+=(mariadb-server)
    command -v memcached >/dev/null || daemons+=(memcached)
    command -v mosquitto >/dev/null || daemons+=(mosquitto)
    command -v haproxy >/dev/null || daemons+=(haproxy)
    command -v apache2 >/dev/null || daemons+=(apache2)
    command -v sshd >/dev/null || daemons+=(openssh-server)
    command -v caddy >/dev/null || daemons+=(caddy)
    # dnsmasq-base alone (NetworkManager's, libvirt's) has the binary, not /etc/dnsmasq.conf
    [ -f /etc/dnsmasq.conf ] || daemons+=(dnsmasq)
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || daemons+=(rabbitmq-server)
    # chrony conflicts with every other time daemon (installing it would remove the host's
    # systemd-timesyncd): its package is unpacked under $CHRONY_ROOT, never installed
    CHRONY_ROOT=/opt/bindscope-tests/chrony
    chrony_missing=0
    if ! command -v chronyd >/dev/null && [ ! -x $CHRONY_ROOT/usr/sbin/chronyd ]; then
        chrony_missing=1
        for lib in libcap2 libedit2 libgnutls30 libnettle8 libseccomp2; do
            dpkg-query -W -f='${db:Status-Abbrev}' $lib 2>/dev/null | grep -q '^ii' || need+=($lib)
        done
    fi
    if [ ${#need[@]} -gt 0 ] || [ ${#daemons[@]} -gt 0 ] || [ $chrony_missing = 1 ]; then
        apt-get update -qq
    fi
    if [ $chrony_missing = 1 ]; then
        echo "run.sh: unpacking chrony from Debian into $CHRONY_ROOT (not installed)"
        dl=$(mktemp -d)
        (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root chrony)
        mkdir -p $CHRONY_ROOT
        dpkg-deb -x "$dl"/chrony_*.deb $CHRONY_ROOT
        rm -rf "$dl"
    fi
    if [ ${#need[@]} -gt 0 ]; then
        echo "run.sh: installing from Debian: ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    if [ ${#daemons[@]} -gt 0 ]; then
        echo "run.sh: installing from Debian, services not started: ${daemons[*]}"
        # policy-rc.d answering 101 keeps the packages from starting their services
        made_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            made_policy=1
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${daemons[@]}" >/dev/null
        if [ $made_policy = 1 ]; then
            rm -f /usr/sbin/policy-rc.d
            trap - EXIT
        fi
        # where systemd started one anyway, stop it: it must not listen on the host
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
            for pkg in "${daemons[@]}"; do
                case $pkg in
                    chromium) continue ;;
                    mariadb-server) units=mariadb ;;
                    postgresql-15) units=postgresql ;;
                    openssh-server) units=ssh ;;
                    # erlang-base's epmd listens from a socket unit of its own
                    rabbitmq-server) units="rabbitmq-server epmd.socket epmd.service" ;;
                    *) units=$pkg ;;
                esac
                for unit in $units; do
                    systemctl disable --now "$unit" 2>/dev/null || true
                done
            done
            # D-Bus activation (its dbus-org.fedoraproject.FirewallD1 alias) or another
            # unit's dependency would start it again: masked, nothing can
            if [[ " ${daemons[*]} " == *" firewalld "* ]]; then
                systemctl mask --now firewalld 2>/dev/null || true
            fi
        fi
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
