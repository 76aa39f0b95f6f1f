#!/usr/bin/env bash
# The dashboard in a real browser against the running demo stack (issue 23): installs Debian's
# chromium (and CJK fonts) and playwright-core when missing, builds the demo's debug binaries
# when they are missing or stale (pipeline, gateway, simulate, api), starts the whole stack
# through `run-demo.sh --profile debug --no-build` (its open mode: a small fleet replays two
# days of history through the gateway, then keeps reporting live) on its own database
# `wm_browser_<pid>`, waits until the history is stored and the detectors have raised alarms,
# starts a bill run through the API, runs tests/browser/dashboard.mjs with the demo's own
# credentials (target/demo/credentials.txt), then stops the stack (SIGTERM to run-demo.sh,
# which stops its children cleanly) and drops the database. Screenshots go to docs/screenshots/
# (SHOTS overrides).
#
# Env: DATABASE_URL, MQTT_URL (as .ci/run), CARGO_TARGET_DIR, BROWSER_METERS (default 300),
# BROWSER_HISTORY_H (default 48), KEEP_STACK=1 leaves the stack up (stop it with
# `kill <pid of run-demo.sh>`, printed).
# The demo uses fixed ports (gateway 5683/8088/9011/9464, Modbus 5020, pipeline metrics 9187):
# one demo at a time on a machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export MQTT_URL="${MQTT_URL:-mqtt://127.0.0.1:1883}"
export NO_COLOR=1
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/debug"
RUN="$TARGET/browser-test"
DEMO_RUN="target/demo"   # run-demo.sh's logs and generated files
SHOTS="${SHOTS:-docs/screenshots}"
DB="wm_browser_$$"
METERS="${BROWSER_METERS:-300}"
HISTORY_H="${BROWSER_HISTORY_H:-48}"
log() { printf '\n=== %s\n' "$*"; }
started_s=$(date +%s)

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

# After `cargo nextest run --workspace` these are up to date and this is a no-op; on a fresh
# clone it builds them (debug, as run-demo.sh --profile debug expects).
log "build (debug: pipeline, gateway, simulate, api)"
cargo build -p pipeline -p gateway -p simulators -p api --bins

# --- the demo stack -------------------------------------------------------------------------
mkdir -p "$RUN"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
DB_URL="${DATABASE_URL%/*}/$DB"
demo_pid=""
cleanup() {
    local rc=$?
    if [ "${KEEP_STACK:-0}" = 1 ]; then
        echo "stack left running: run-demo.sh pid $demo_pid, $BASE, database $DB" >&2
    else
        if [ -n "$demo_pid" ] && kill -0 "$demo_pid" 2>/dev/null; then
            # SIGTERM: a background job of a script ignores SIGINT; run-demo.sh traps TERM and
            # stops its children newest first (SIGINT each, SIGKILL after 10 s).
            kill -TERM "$demo_pid" 2>/dev/null || true
            for _ in $(seq 1 300); do kill -0 "$demo_pid" 2>/dev/null || break; sleep 0.2; done
            if kill -0 "$demo_pid" 2>/dev/null; then
                echo "run-demo.sh did not stop within 60 s; killing it" >&2
                kill -KILL "$demo_pid" 2>/dev/null || true
            fi
            wait "$demo_pid" 2>/dev/null || true
        fi
        psql "$DATABASE_URL" -X -q -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" || true
    fi
    if [ "$rc" != 0 ]; then
        echo "logs: $RUN/run-demo.log, $DEMO_RUN/*.log" >&2
        tail -n 20 "$RUN/run-demo.log" >&2 || true
        grep -h -E 'ERROR|WARN' "$DEMO_RUN"/api.log "$DEMO_RUN"/pipeline.log 2>/dev/null | tail -n 20 >&2 || true
    fi
    echo "browser test: $(( $(date +%s) - started_s )) s in all" >&2
    exit "$rc"
}
trap cleanup EXIT

log "run-demo.sh --profile debug --no-build --meters $METERS --history-hours $HISTORY_H"
# 100 ms per simulated hour: the history is replayed in seconds; live hourly reads follow.
DEMO_DATABASE="$DB" RUST_LOG="${RUST_LOG:-info,pipeline::registry::sync=error}" \
    bash run-demo.sh --profile debug --no-build --meters "$METERS" --history-hours "$HISTORY_H" \
    --step-ms 100 --listen "127.0.0.1:$PORT" >"$RUN/run-demo.log" 2>&1 &
demo_pid=$!
# Ready: the banner is printed once every service is up and the users exist.
for _ in $(seq 1 600); do
    grep -q '^=== water-meter demo running ===' "$RUN/run-demo.log" 2>/dev/null && break
    kill -0 "$demo_pid" 2>/dev/null || { echo "run-demo.sh ended before the stack was up" >&2; exit 1; }
    sleep 0.5
done
grep -q '^=== water-meter demo running ===' "$RUN/run-demo.log" || { echo "the demo stack was not up within 300 s" >&2; exit 1; }
curl -fsS "$BASE/readyz" >/dev/null || { echo "the API at $BASE is not ready" >&2; exit 1; }
cred() { awk -v r="$1" '$1 == r { print $3 " " $5 }' "$DEMO_RUN/credentials.txt"; }
read -r OP_USER OP_PASS < <(cred meter_operator)
read -r AUDITOR_USER AUDITOR_PASS < <(cred auditor)
read -r BILLING_USER BILLING_PASS < <(cred billing)
[ -n "${OP_PASS:-}" ] && [ -n "${AUDITOR_PASS:-}" ] && [ -n "${BILLING_PASS:-}" ] \
    || { echo "no demo credentials in $DEMO_RUN/credentials.txt" >&2; exit 1; }

q() { psql "$DB_URL" -X -A -t -v ON_ERROR_STOP=1 -c "$1"; }
# The history stored, rollups folded, the detectors' alarms (leak, burst, silent meter, hydrant
# illegal use) raised, the gateway online, a command issued by the control service.
want_readings=$(( METERS * HISTORY_H * 8 / 10 ))
for _ in $(seq 1 180); do
    n=$(q "SELECT count(*) FROM readings")
    a=$(q "SELECT count(*) FROM alarms WHERE state = 'open' AND meter_id NOT LIKE 'gateway:%'")
    r=$(q "SELECT count(*) FROM rollup_daily")
    g=$(q "SELECT count(*) FROM gateways WHERE online")
    c=$(q "SELECT count(*) FROM commands")
    # The history replayed to the current hour (meter clocks; Modbus instruments read now).
    h=$(q "SELECT count(*) FROM readings WHERE quantity = 'volume' AND clock = 'meter'
           AND ts >= date_trunc('hour', now()) - interval '1 hour'")
    [ "$h" -ge 1 ] && [ "$n" -ge "$want_readings" ] && [ "$a" -ge 1 ] && [ "$r" -ge 100 ] && [ "$g" -ge 1 ] && [ "$c" -ge 1 ] && break
    kill -0 "$demo_pid" 2>/dev/null || { echo "run-demo.sh ended" >&2; exit 1; }
    sleep 1
done
echo "readings $n (want >= $want_readings; $h in the last hour), open meter alarms $a, daily rollups $r, gateways online $g, commands $c"
q "SELECT kind, count(*) FROM alarms GROUP BY 1 ORDER BY 1" | tr '\n' ' '; echo
[ "$h" -ge 1 ] && [ "$n" -ge "$want_readings" ] && [ "$a" -ge 1 ] && [ "$g" -ge 1 ] && [ "$c" -ge 1 ] \
    || { echo "the demo stack did not store the history, raise alarms or issue commands" >&2; exit 1; }

log "a bill run through the API (billing role)"
BILL_TOKEN=$(curl -fsS -H 'Content-Type: application/json' \
    -d "{\"username\":\"$BILLING_USER\",\"password\":\"$BILLING_PASS\"}" "$BASE/api/v1/auth/login" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
month=$(date -u +%Y-%m-01); prev=$(date -u -d "$month -1 month" +%Y-%m-%d)
out=$(curl -sS -w '\n%{http_code}' -H "Authorization: Bearer $BILL_TOKEN" -H 'Content-Type: application/json' \
    -d "{\"book\":\"BOOK-0\",\"period_start\":\"$prev\",\"period_end\":\"$month\"}" "$BASE/api/v1/bill-runs")
case "${out##*$'\n'}" in 2??) ;; *) echo "POST /api/v1/bill-runs → $out" >&2; exit 1 ;; esac
for _ in $(seq 1 60); do
    [ "$(q "SELECT count(*) FROM bill_runs WHERE finished_at IS NOT NULL")" -ge 1 ] && break
    sleep 1
done

log "browser"
# A customer meter with an estimated or rejected register read (VEE's gap fill or a rejected
# read, which the meter page marks), and of those the one with the most register reads, so
# its charts have points to draw; MARKED=1 tells the check to require the marks.
read -r METER MARKED < <(q "SELECT m.meter_no || ' ' || (r.marked > 0)::int FROM meters m JOIN (
           SELECT meter_id, count(*) AS n,
                  count(*) FILTER (WHERE quality IN ('estimated', 'rejected')) AS marked
           FROM readings WHERE quantity = 'volume' GROUP BY 1) r USING (meter_id)
           WHERE m.role = 'customer' AND m.meter_no IS NOT NULL
           ORDER BY r.marked > 0 DESC, r.n DESC, 1 LIMIT 1") || true
echo "meter $METER (estimated or rejected reads: $MARKED)"
BASE="$BASE" SHOTS="$SHOTS" METER="$METER" MARKED="$MARKED" HYDRANTS=5 \
    OP_USER="$OP_USER" OP_PASS="$OP_PASS" AUDITOR_USER="$AUDITOR_USER" AUDITOR_PASS="$AUDITOR_PASS" \
    BILLING_USER="$BILLING_USER" BILLING_PASS="$BILLING_PASS" node tests/browser/dashboard.mjs
