#!/usr/bin/env bash
# Exercises scripts/services.sh's failure and repair paths with stubbed commands (no real
# service is stopped, started or reconfigured).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
fail=0
check() { if [ "$1" = "$2" ]; then echo "ok: $3"; else echo "FAIL: $3 (got $1, want $2)"; fail=1; fi; }

# 1. Mosquitto never comes up: stub mosquitto, closed port -> non-zero.
( mosquitto() { echo "stub mosquitto $*"; }; MQTT_URL=mqtt://127.0.0.1:1; wm_wait_tcp() { return 1; }; wm_start_mosquitto ); check $? 1 "mosquitto never answering fails"
# ...and under set -e the caller stops.
( set -e; mosquitto() { :; }; wm_wait_tcp() { return 1; }; MQTT_URL=mqtt://127.0.0.1:1; wm_start_services_m() { wm_start_mosquitto; echo "NOT REACHED"; }; wm_start_services_m ) | grep -q "NOT REACHED"; check $? 1 "set -e caller stops on broker failure"
# 2. Mosquitto already up: success.
( wm_start_mosquitto >/dev/null ); check $? 0 "running broker accepted"

# 3. PostgreSQL answers but refuses (scram): trust lines prepended, reload, then accepted.
t=$(mktemp -d); mkdir -p "$t/15/main"
printf 'local all postgres peer\nhost all all 127.0.0.1/32 scram-sha-256\n' >"$t/15/main/pg_hba.conf"
(
  WM_PG_ETC=$t
  pg_isready() { return 0; }
  pg_ctlcluster() { echo "stub pg_ctlcluster $*" >>"$t/calls"; }
  psql() { [ "$(head -n 1 "$t/15/main/pg_hba.conf")" = "host all all 127.0.0.1/32 trust" ] || { echo "psql: password authentication failed" >&2; return 2; }; }
  sleep() { :; }
  wm_start_postgres
); check $? 0 "refusing cluster repaired"
check "$(head -n 2 "$t/15/main/pg_hba.conf" | tr '\n' '|')" "host all all 127.0.0.1/32 trust|host all all ::1/128 trust|" "trust lines at the top"
check "$(cat "$t/calls")" "stub pg_ctlcluster --skip-systemctl-redirect 15 main reload" "cluster reloaded"

# 4. Still refused after the repair: fails loudly.
(
  WM_PG_ETC=$t; pg_isready() { return 0; }; pg_ctlcluster() { :; }; psql() { return 2; }; sleep() { :; }
  wm_start_postgres
) 2>"$t/err"; check $? 1 "still refusing fails"
grep -q "still refuses" "$t/err"; check $? 0 "error says it still refuses"

# 5. Not answering and never comes up: start attempted, then fails.
(
  WM_PG_ETC=$t; pg_isready() { return 2; }; pg_ctlcluster() { echo "start $*" >"$t/start"; }; sleep() { :; }
  wm_start_postgres
) >/dev/null 2>&1; check $? 1 "postgres never answering fails"
check "$(cat "$t/start")" "start --skip-systemctl-redirect 15 main start" "cluster start attempted"

# 6. The real, running PostgreSQL: accepted without changes.
before=$(md5sum /etc/postgresql/*/main/pg_hba.conf)
( wm_start_postgres >/dev/null ); check $? 0 "running PostgreSQL accepted"
check "$(md5sum /etc/postgresql/*/main/pg_hba.conf)" "$before" "real pg_hba.conf untouched"
rm -rf "$t"
exit $fail
