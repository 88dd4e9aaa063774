#!/usr/bin/env bash
# Set up everything mailerd needs on a fresh Debian machine: system packages
# (systemd-python builds against libsystemd), a virtualenv in .venv, and the
# project installed into it with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev)
# packaging/build-deb.sh and tests/test_deb.py: strip (binutils), lintian (dpkg-deb is in dpkg)
APT_PACKAGES+=(binutils lintian)
# tests/test_real_postfix.py: a private Postfix with Dovecot's SASL auth and a test CA (openssl).
# They are installed unconfigured and never started as system services.
APT_PACKAGES+=(postfix dovecot-core openssl)
# tests/test_bounces.py: a private Dovecot IMAP server holding the bounce mailbox
APT_PACKAGES+=(dovecot-imapd)
# tests/postgres.py: a private PostgreSQL cluster (initdb in a temp dir) for the journal on
# PostgreSQL; the package must not create or start a cluster of its own (createcluster.conf below)
APT_PACKAGES+=(postgresql)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    # keep the packages' services from starting: the tests run their own private instances
    POLICY=/usr/sbin/policy-rc.d
    if [[ ! -e $POLICY ]]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee $POLICY >/dev/null
        $SUDO chmod 755 $POLICY
        trap "$SUDO rm -f $POLICY" EXIT
    fi
    # no `main` cluster from postgresql-common: the tests run their own (--force-confold keeps this file)
    CREATECLUSTER=/etc/postgresql-common/createcluster.conf
    if [[ ! -e $CREATECLUSTER ]]; then
        $SUDO mkdir -p "$(dirname $CREATECLUSTER)"
        echo "create_main_cluster = false" | $SUDO tee $CREATECLUSTER >/dev/null
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
