#!/usr/bin/env bash
# The dashboard in a real browser (issue 23): installs Debian's chromium (and CJK fonts) and
# playwright-core when missing, starts a stack on its own database `wm_browser_<pid>` — the
# pipeline worker, the registry sync and the API, debug binaries — registers a fleet through
# the registry import, pushes three days of reads through the signed API push (the pipeline's
# VEE and detectors turn them into rollups, estimates, rejections and alarms), publishes two
# gateway statuses on the broker, creates users per role with `api user-add`, then runs
# tests/browser/dashboard.mjs. Screenshots go to docs/screenshots/ (SHOTS overrides).
#
# Env: DATABASE_URL, MQTT_URL (as .ci/run), CARGO_TARGET_DIR, KEEP_STACK=1 leaves the stack up.
set -euo pipefail
cd "$(dirname "$0")/.."
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export MQTT_URL="${MQTT_URL:-mqtt://127.0.0.1:1883}"
# Every pushed meter is "heard through a gateway the registry does not name" (the API node):
# that warning per meter is noise here.
export RUST_LOG="${RUST_LOG:-info,pipeline::registry::sync=error}" NO_COLOR=1
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/debug"
RUN="$TARGET/browser-test"
SHOTS="${SHOTS:-docs/screenshots}"
DB="wm_browser_$$"
ROOT="wm/browser-$$"
MQTT_HOST=$(echo "$MQTT_URL" | sed -E 's#^[a-z]+://([^:/]+).*#\1#')
MQTT_PORT=$(echo "$MQTT_URL" | sed -E 's#^.*:([0-9]+)/?$#\1#')
log() { printf '\n=== %s\n' "$*"; }

# --- tools ----------------------------------------------------------------------------------
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
fc-list 2>/dev/null | grep -qi "noto sans cjk" || need+=(fonts-noto-cjk)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
( cd tests/browser && npm ci --no-audit --no-fund --silent )

log "build (debug: pipeline, api)"
cargo build -p pipeline -p api --bins

# --- stack ----------------------------------------------------------------------------------
mkdir -p "$RUN"
psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$DB\""
export DATABASE_URL="${DATABASE_URL%/*}/$DB"
PIDS=()
cleanup() {
    local rc=$?
    if [ "${KEEP_STACK:-0}" != 1 ]; then
        for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
        for pid in "${PIDS[@]}"; do
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL "$pid" 2>/dev/null || true
        done
        psql "${DATABASE_URL%/*}/postgres" -X -q -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" || true
        mosquitto_pub -h "$MQTT_HOST" -p "$MQTT_PORT" -r -n -t "$ROOT/gw-north/status" 2>/dev/null || true
        mosquitto_pub -h "$MQTT_HOST" -p "$MQTT_PORT" -r -n -t "$ROOT/gw-south/status" 2>/dev/null || true
    fi
    [ "$rc" = 0 ] || { echo "logs: $RUN/*.log" >&2; grep -h -E 'ERROR|WARN' "$RUN"/api.log "$RUN"/pipeline.log | tail -n 30 >&2 || true; }
    exit "$rc"
}
trap cleanup EXIT

"$BIN/pipeline" migrate
for d in 0 1; do
    "$BIN/pipeline" registry --actor browser-test book --code "BOOK-$d" --name "DMA-$d 抄表册" --cycle monthly >/dev/null
done
node tests/browser/seed.mjs registry >"$RUN/registry.csv"
"$BIN/pipeline" registry --actor browser-test import "$RUN/registry.csv"

# A free port for the API.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
export API_JWT_SECRET="browser-test-secret-$$-$RANDOM$RANDOM"

"$BIN/pipeline" run --topic-root "$ROOT" --client-id "browser-$$-worker" >"$RUN/pipeline.log" 2>&1 &
PIDS+=($!)
"$BIN/pipeline" registry sync --topic-root "$ROOT" --client-id "browser-$$-registry" \
    >"$RUN/registry-sync.log" 2>&1 &
PIDS+=($!)
"$BIN/api" serve --listen "127.0.0.1:$PORT" --topic-root "$ROOT" --node-id "browser-$$-api" \
    --tariff tariffs/nanan-2025.toml --second-factor hydrant_unlock,valve_close,valve_open \
    >"$RUN/api.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do curl -fsS "$BASE/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "$BASE/readyz" >/dev/null || { echo "the API did not become ready" >&2; exit 1; }

# Gateways announce themselves with a retained status, as `gateway run` does.
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
mosquitto_pub -h "$MQTT_HOST" -p "$MQTT_PORT" -q 1 -r -t "$ROOT/gw-north/status" \
    -m "{\"state\":\"online\",\"version\":\"2.4.1\",\"at\":\"$now\"}"
mosquitto_pub -h "$MQTT_HOST" -p "$MQTT_PORT" -q 1 -r -t "$ROOT/gw-south/status" \
    -m "{\"state\":\"offline\",\"version\":\"2.3.9\",\"at\":\"$now\"}"

log "reads through the signed push"
"$BIN/api" client-add --id browser-seed --secret "seed-secret-$$-0123456789" >/dev/null
BASE="$BASE" CLIENT=browser-seed SECRET="seed-secret-$$-0123456789" node tests/browser/seed.mjs push
q() { psql "$DATABASE_URL" -X -A -t -v ON_ERROR_STOP=1 -c "$1"; }
# Wait for the worker to store them and for the rollups and detectors to follow.
for _ in $(seq 1 120); do
    n=$(q "SELECT count(*) FROM readings")
    a=$(q "SELECT count(*) FROM alarms WHERE state = 'open' AND meter_id NOT LIKE 'gateway:%'")
    r=$(q "SELECT count(*) FROM rollup_daily")
    g=$(q "SELECT count(*) FROM gateways WHERE online IS NOT NULL")
    [ "$n" -ge 6000 ] && [ "$a" -ge 1 ] && [ "$r" -ge 100 ] && [ "$g" -ge 2 ] && break
    sleep 1
done
echo "readings $n, open meter alarms $a, daily rollups $r, gateways $g"
q "SELECT quality, count(*) FROM readings GROUP BY 1 ORDER BY 1" | tr '\n' ' '; echo
q "SELECT kind, count(*) FROM alarms GROUP BY 1 ORDER BY 1" | tr '\n' ' '; echo
[ "$n" -ge 6000 ] && [ "$a" -ge 1 ] || { echo "the stack did not store the reads or raise alarms" >&2; exit 1; }

log "users, permits, commands and a bill run through the API"
OP_PASS="op-pass-$$-$RANDOM"; AUDITOR_PASS="au-pass-$$-$RANDOM"; BILLING_PASS="bi-pass-$$-$RANDOM"
"$BIN/api" user-add --username operator --password "$OP_PASS" --role meter_operator --org '*'
"$BIN/api" user-add --username auditor --password "$AUDITOR_PASS" --role auditor --org '*'
"$BIN/api" user-add --username billing --password "$BILLING_PASS" --role billing --org nanan
login() {
    curl -fsS -H 'Content-Type: application/json' -d "{\"username\":\"$1\",\"password\":\"$2\"}" \
        "$BASE/api/v1/auth/login" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}
OP_TOKEN=$(login operator "$OP_PASS")
BILL_TOKEN=$(login billing "$BILLING_PASS")
post() {
    local out
    out=$(curl -sS -w '\n%{http_code}' -H "Authorization: Bearer $1" -H 'Content-Type: application/json' -d "$3" "$BASE$2")
    case "${out##*$'\n'}" in
        2??) ;;
        *) echo "POST $2 → $out" >&2; return 1 ;;
    esac
}
from=$(date -u -d '-1 hour' +%Y-%m-%dT%H:%M:%SZ); to=$(date -u -d '+3 hours' +%Y-%m-%dT%H:%M:%SZ)
post "$OP_TOKEN" /api/v1/hydrant-permits \
    "{\"id\":\"PMT-001\",\"hydrant\":\"HY-2\",\"holder\":\"南安市政养护\",\"valid_from\":\"$from\",\"valid_to\":\"$to\"}"
post "$OP_TOKEN" /api/v1/commands \
    '{"id":"ui-demo-time-1","device":"NA-0062","action":"set_time","reason":"clock drift"}'
post "$OP_TOKEN" /api/v1/commands \
    '{"id":"ui-demo-lock-3","device":"HY-3","action":"hydrant_lock","reason":"end of works"}'
month=$(date -u +%Y-%m-01); prev=$(date -u -d "$month -1 month" +%Y-%m-%d)
post "$BILL_TOKEN" /api/v1/bill-runs "{\"book\":\"BOOK-0\",\"period_start\":\"$prev\",\"period_end\":\"$month\"}"
for _ in $(seq 1 60); do
    [ "$(q "SELECT count(*) FROM bill_runs WHERE finished_at IS NOT NULL")" -ge 1 ] && break
    sleep 1
done

log "browser"
METER=$(q "SELECT meter_no FROM meters WHERE meter_id = 'cjt188:78330000000001'")
BASE="$BASE" SHOTS="$SHOTS" METER="$METER" OP_PASS="$OP_PASS" AUDITOR_PASS="$AUDITOR_PASS" \
    BILLING_PASS="$BILLING_PASS" node tests/browser/dashboard.mjs
