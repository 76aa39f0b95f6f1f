#!/usr/bin/env bash
# Shared set-up of `.ci/run` and `run-demo.sh`, so the two cannot drift: installs what is
# missing (Debian packages, rustup components) and starts PostgreSQL and Mosquitto when they
# are not answering, failing loudly when either does not come up.
#
# Sourced: defines the functions below and changes nothing. Executed (`bash scripts/services.sh`):
# runs `wm_install_tools` then `wm_start_services`.
#
# Uses DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres) and MQTT_URL (default
# mqtt://127.0.0.1:1883); only local services are started or configured.

WM_DEFAULT_DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
WM_DEFAULT_MQTT_URL="mqtt://127.0.0.1:1883"
# Debian's PostgreSQL clusters (<version>/main/pg_hba.conf); overridable for testing this script.
WM_PG_ETC="${WM_PG_ETC:-/etc/postgresql}"

wm_log() { printf '\n=== %s\n' "$*"; }
wm_die() {
    echo "error: $*" >&2
    return 1
}

wm_apt_updated=0
wm_apt_install() {
    if [ "$wm_apt_updated" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
        wm_apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Debian packages (PostgreSQL, Mosquitto and its clients, socat, OpenSSL headers for the
# gateway's native-tls) and the rustup components clippy and rustfmt, each only when missing.
wm_install_tools() {
    local need=()
    command -v pg_ctlcluster >/dev/null || need+=(postgresql)
    command -v psql >/dev/null || need+=(postgresql-client)
    command -v mosquitto >/dev/null || need+=(mosquitto)
    command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
    command -v socat >/dev/null || need+=(socat)
    command -v pkg-config >/dev/null || need+=(pkg-config)
    command -v openssl >/dev/null || need+=(openssl)
    dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev) # native-tls (gateway MQTT over TLS)
    if [ "${#need[@]}" -gt 0 ]; then
        echo "installing: ${need[*]}"
        wm_apt_install "${need[@]}" || wm_die "apt-get install ${need[*]} failed" || return 1
    fi
    command -v cargo >/dev/null || wm_die "cargo is missing: install Rust with rustup" || return 1
    if command -v rustup >/dev/null; then
        local installed c
        installed=$(rustup component list --installed 2>/dev/null || true)
        for c in clippy rustfmt; do
            echo "$installed" | grep -q "^$c" || rustup component add "$c" || return 1
        done
    else
        echo "rustup not found: clippy and rustfmt must come with the installed toolchain"
    fi
}

# host and port of a URL such as postgres://user@host:5432/db or mqtt://host:1883
wm_url_host() {
    local rest="${1#*://}"
    rest="${rest#*@}"
    rest="${rest%%/*}"
    rest="${rest%%\?*}"
    echo "${rest%:*}"
}
wm_url_port() {
    local rest="${1#*://}" default="$2"
    rest="${rest#*@}"
    rest="${rest%%/*}"
    rest="${rest%%\?*}"
    case "$rest" in
    *:*) echo "${rest##*:}" ;;
    *) echo "$default" ;;
    esac
}

# wm_tcp_open HOST PORT: true when something accepts a TCP connection there.
wm_tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wm_wait_tcp HOST PORT SECONDS: true as soon as HOST:PORT accepts, false after SECONDS.
wm_wait_tcp() {
    local i
    for ((i = 0; i < $3; i++)); do
        wm_tcp_open "$1" "$2" && return 0
        sleep 1
    done
    wm_tcp_open "$1" "$2"
}

# wm_db_answers: the server of DATABASE_URL accepts our connection and a query (never prompts
# for a password).
wm_db_answers() {
    PGCONNECT_TIMEOUT=5 psql -w "${DATABASE_URL:-$WM_DEFAULT_DATABASE_URL}" -X -Atqc 'select 1' >/dev/null 2>&1
}

# The lines that make a local cluster accept TCP connections from this machine without a
# password (a freshly apt-installed PostgreSQL asks for one, scram-sha-256, on 127.0.0.1).
WM_TRUST_LINES=$'host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust'

# wm_hba_prepend_trust FILE: puts WM_TRUST_LINES at the top of FILE (pg_hba.conf is first-match)
# unless they are there already; keeps the file's owner and mode.
wm_hba_prepend_trust() {
    local file="$1" tmp
    [ -f "$file" ] || wm_die "no pg_hba.conf at $file" || return 1
    if [ "$(head -n 2 "$file")" = "$WM_TRUST_LINES" ]; then
        return 0
    fi
    tmp=$(mktemp "$file.XXXXXX") || return 1
    {
        echo "$WM_TRUST_LINES"
        echo "# The two lines above were added by scripts/services.sh (tests and demo connect"
        echo "# over TCP as postgres without a password)."
        cat "$file"
    } >"$tmp" || { rm -f "$tmp"; return 1; }
    chown --reference="$file" "$tmp" 2>/dev/null || true
    chmod --reference="$file" "$tmp" 2>/dev/null || true
    mv "$tmp" "$file"
}

# PostgreSQL: starts the local cluster when nothing answers; when it answers but refuses
# DATABASE_URL (password auth on a fresh install), trusts local TCP connections and reloads.
wm_start_postgres() {
    local url="${DATABASE_URL:-$WM_DEFAULT_DATABASE_URL}" host port version hba
    host=$(wm_url_host "$url")
    port=$(wm_url_port "$url" 5432)
    # The newest cluster version that has a main cluster (<version>/main).
    version=$(find "$WM_PG_ETC" -mindepth 2 -maxdepth 2 -type d -name main 2>/dev/null \
        | sed 's#/main$##; s#.*/##' | sort -V | tail -n 1 || true)
    if ! pg_isready -q -h "$host" -p "$port"; then
        [ -n "$version" ] || wm_die "PostgreSQL is not answering on $host:$port and no local cluster is in $WM_PG_ETC" || return 1
        echo "starting PostgreSQL $version"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start \
            || wm_die "pg_ctlcluster $version main start failed" || return 1
        for _ in $(seq 1 30); do pg_isready -q -h "$host" -p "$port" && break; sleep 1; done
    fi
    pg_isready -h "$host" -p "$port" || wm_die "PostgreSQL is not answering on $host:$port" || return 1
    if ! wm_db_answers; then
        hba=$(ls "$WM_PG_ETC/$version/main/pg_hba.conf" 2>/dev/null || true)
        [ -n "$version" ] && [ -n "$hba" ] \
            || wm_die "PostgreSQL answers but refuses $url, and there is no local pg_hba.conf to fix" || return 1
        echo "PostgreSQL refuses $url (password authentication?): trusting 127.0.0.1 and ::1 in $hba"
        wm_hba_prepend_trust "$hba" || wm_die "cannot edit $hba" || return 1
        pg_ctlcluster --skip-systemctl-redirect "$version" main reload \
            || wm_die "pg_ctlcluster $version main reload failed" || return 1
        for _ in $(seq 1 10); do wm_db_answers && break; sleep 1; done
        wm_db_answers || {
            psql -w "$url" -X -Atqc 'select 1' >&2 || true
            wm_die "PostgreSQL still refuses $url after trusting local connections in $hba"
            return 1
        }
    fi
    echo "PostgreSQL accepts $url"
}

# Mosquitto: starts the local broker when nothing answers on MQTT_URL's port; fails when it does
# not come up.
wm_start_mosquitto() {
    local url="${MQTT_URL:-$WM_DEFAULT_MQTT_URL}" host port
    host=$(wm_url_host "$url")
    port=$(wm_url_port "$url" 1883)
    if ! wm_tcp_open "$host" "$port"; then
        echo "starting Mosquitto"
        mkdir -p /run/mosquitto /var/lib/mosquitto /var/log/mosquitto
        chown mosquitto: /run/mosquitto /var/lib/mosquitto /var/log/mosquitto 2>/dev/null || true
        mosquitto -d -c /etc/mosquitto/mosquitto.conf || wm_die "mosquitto did not start" || return 1
        wm_wait_tcp "$host" "$port" 30 || true
    fi
    wm_tcp_open "$host" "$port" \
        || wm_die "Mosquitto is not answering on $host:$port (see /var/log/mosquitto/mosquitto.log)" || return 1
    echo "mosquitto answering on $host:$port"
}

wm_start_services() {
    wm_start_postgres && wm_start_mosquitto
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    export DATABASE_URL="${DATABASE_URL:-$WM_DEFAULT_DATABASE_URL}"
    export MQTT_URL="${MQTT_URL:-$WM_DEFAULT_MQTT_URL}"
    wm_log "tools"
    wm_install_tools
    wm_log "services"
    wm_start_services
fi
