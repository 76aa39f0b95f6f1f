#!/usr/bin/env bash
# The README's first command: the whole stack with a simulated fleet of 10,000 meters.
#
#   bash run-demo.sh                    # until Ctrl-C: a week of history, then live hourly reads
#   bash run-demo.sh --duration 120     # bounded: 120 s of fleet time, then a summary; exit 0
#                                       # only when readings of this run were stored
# Options:
#   --duration SECS     bounded run (one simulated hour per --step-ms), then the summary
#   --meters N          fleet size (default 10000, at least 100)
#   --profile P         release (default) or debug binaries (target/<profile>/)
#   --no-build          use the binaries already built
#   --listen ADDR       the API and dashboard (default 127.0.0.1:8080)
#   --step-ms MS        real milliseconds per simulated hour (default 1000)
#   --history-hours H   without --duration: hours of history replayed before live (default 168)
#
# What it does: installs what is missing and starts PostgreSQL and Mosquitto when they are not
# answering (scripts/services.sh, shared with .ci/run); builds; recreates the demo database
# (DEMO_DATABASE, default wm_demo) and migrates it; registers the fleet through the registry
# import (all protocols, 2 DMAs with inlet meters and pressure points, books, customers,
# 5 hydrants, every device placed around Nan'an); starts `pipeline run` (with the control service and the arrears rule),
# `gateway run`, `pipeline registry sync`, `pipeline scheduler run` and `api serve`; grants a
# hydrant permit and records a customer in arrears; prints the dashboard URL and the demo
# credentials of every role; then drives the fleet (`simulate demo`) with scripted faults: a
# leak, a burst on an auto-close valve meter, a hydrant illegal use, a silent meter. Ctrl-C
# stops every process it started (SIGINT, wait, SIGKILL after 10 s). Production runs each
# service alone with its own config: docs/operations.md.
#
# Environment: DATABASE_URL (server of the demo database), MQTT_URL, RUST_LOG, DEMO_DATABASE,
# DEMO_NBIOT_KEY_SEED, CARGO_TARGET_DIR. Logs and generated files: target/demo/.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
DURATION=""
METERS=10000
PROFILE=release
BUILD=1
LISTEN=127.0.0.1:8080
STEP_MS=1000
HISTORY_H=168
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="${2:?--duration SECS}"; shift 2 ;;
        --meters) METERS="${2:?--meters N}"; shift 2 ;;
        --profile) PROFILE="${2:?--profile release|debug}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --listen) LISTEN="${2:?--listen ADDR}"; shift 2 ;;
        --step-ms) STEP_MS="${2:?--step-ms MS}"; shift 2 ;;
        --history-hours) HISTORY_H="${2:?--history-hours H}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
num() { [[ "$2" =~ ^[0-9]+$ ]] || { echo "$1 must be a whole number, not '$2'" >&2; exit 2; }; }
num --meters "$METERS"; num --step-ms "$STEP_MS"; num --history-hours "$HISTORY_H"
[ -z "$DURATION" ] || num --duration "$DURATION"
[ "$METERS" -ge 100 ] || { echo "--meters must be at least 100 (the scripted faults need them)" >&2; exit 2; }
[ "$STEP_MS" -ge 1 ] || { echo "--step-ms must be at least 1" >&2; exit 2; }
case "$PROFILE" in release|debug) ;; *) echo "--profile is release or debug" >&2; exit 2 ;; esac

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export MQTT_URL="${MQTT_URL:-mqtt://127.0.0.1:1883}"
export RUST_LOG="${RUST_LOG:-info}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/$PROFILE"
RUN_DIR="target/demo"
DEMO_DB="${DEMO_DATABASE:-wm_demo}"
PIPELINE_METRICS=127.0.0.1:9187

# --- services ---------------------------------------------------------------------------
# shellcheck source=scripts/services.sh
. scripts/services.sh
wm_install_tools
wm_start_services

# --- build and schema -------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
    profile_flag=()
    [ "$PROFILE" = release ] && profile_flag=(--release)
    cargo build -j 2 "${profile_flag[@]}" -p pipeline -p gateway -p simulators -p api
fi
for b in pipeline gateway simulate api; do
    [ -x "$BIN/$b" ] || { echo "$BIN/$b is missing: build it (without --no-build)" >&2; exit 1; }
done
# The demo runs in its own database, recreated each time: a re-run within the same hour would
# otherwise send the same (meter, time) readings again and store nothing new.
psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 \
    -c "DROP DATABASE IF EXISTS \"$DEMO_DB\" WITH (FORCE)" -c "CREATE DATABASE \"$DEMO_DB\""
export DATABASE_URL="${DATABASE_URL%/*}/$DEMO_DB"
"$BIN/pipeline" migrate
mkdir -p "$RUN_DIR"
rm -rf "$RUN_DIR/spool"   # demo/gateway.toml spools here; each run starts empty

# --- the fleet and its scripted faults --------------------------------------------------
# One step = one simulated hour (--step-ms of real time). A bounded run replays the hours up to
# the current one; an open run replays --history-hours, then goes on in real time
# (simulate --not-ahead-of-clock), so no reading ever lies in the future.
if [ -n "$DURATION" ]; then
    steps=$(( DURATION * 1000 / STEP_MS ))
    days=$(( steps / 24 + 1 ))
    [ "$steps" -ge 30 ] || echo "warning: $steps steps: the scripted faults need about 30 (leak: 26 h)" >&2
else
    steps=$HISTORY_H
    days=$(( steps / 24 + 31 ))   # then a month of live hours
fi
start_epoch=$(( $(date -u +%s) / 3600 * 3600 - steps * 3600 ))
at() { date -u -d "@$(( start_epoch + $1 * 3600 ))" +%Y-%m-%dT%H:%M:%SZ; }
end_at=$(date -u -d "@$(( start_epoch + days * 86400 ))" +%Y-%m-%dT%H:%M:%SZ)
wmbus=$(( METERS / 10 ))
coap=$(( METERS * 25 / 100 ))
http=$(( METERS * 10 / 100 ))
conc=$(( METERS - wmbus - coap - http ))
HYDRANTS=5
# Meter indices (registry rows WM<index>): the first $coap are NB-IoT CoAP meters with a valve;
# valve meter 20 (index 19) may be closed on a burst, every 25th is a protected customer.
LEAK=3 BURST=19 ARREARS=7 SILENT=$(( coap + 1 ))
cat >"$RUN_DIR/scenario.toml" <<EOF
name = "run-demo"
description = "run-demo.sh: $METERS meters, $steps hourly steps ending at $(at "$steps")"
seed = 1
start = "$(at 0)"
days = $days

[fleet]
households = $(( METERS - METERS / 10 ))
commercial = $(( METERS / 10 ))
dmas = 2
background_loss_lph = 300.0
mbus_meters = $wmbus

# A customer-side leak from hour 2 on (the leak detector needs 24 h of continuous flow).
[[faults]]
kind = "leak"
meter = $LEAK
from = "$(at 2)"
rate_lph = 40.0

# A burst behind an auto-close valve meter, hours 10-15 (2 h >= 0.4 Q3 raise it).
[[faults]]
kind = "burst"
meter = $BURST
from = "$(at 10)"
until = "$(at 15)"
rate_lph = 2000.0

# An HTTP-push meter that goes silent from hour 20.
[[faults]]
kind = "comm_loss"
meter = $SILENT
from = "$(at 20)"
until = "$end_at"
EOF
# The CoAP meters authenticate (demo/gateway.toml: auth = "frame_mac"): each has its own key,
# derived here from a seed the simulator shares; the gateway reads them from the key file.
NBIOT_KEY_SEED="${DEMO_NBIOT_KEY_SEED:-demo-nbiot-key-seed-2026}"
( umask 077; "$BIN/simulate" nbiot-keys --scenario "$RUN_DIR/scenario.toml" \
    --key-seed "$NBIOT_KEY_SEED" >"$RUN_DIR/nbiot-keys.toml" )
"$BIN/gateway" check-config demo/gateway.toml
# The arrears rule closes valves only on working days in working hours (docs/control.md); the
# demo's calendar makes every hour of today and tomorrow (local time) a working hour so the
# rule acts whenever the demo runs. Production uses the shipped calendar.
today=$(date -u -d "@$(( $(date -u +%s) + 8 * 3600 ))" +%Y-%m-%d)
tomorrow=$(date -u -d "@$(( $(date -u +%s) + 32 * 3600 ))" +%Y-%m-%d)
cat >"$RUN_DIR/calendar.toml" <<EOF
# run-demo.sh: every hour of $today and $tomorrow is a working hour (demo only).
utc_offset = "+08:00"
work_start = "00:00"
work_end = "23:59"
holidays = []
working_days = ["$today", "$tomorrow"]
EOF

# --- the stack in the background ----------------------------------------------------------
PIDS=()
NAMES=()
started() { PIDS+=("$1"); NAMES+=("$2"); }
stopping=0
# Stops the children newest first (the fleet before the gateway before the pipeline): SIGINT,
# which every one of them handles as a clean stop, then up to 10 s, then SIGKILL.
stop_all() {
    [ "$stopping" = 1 ] && return
    stopping=1
    local i pid
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
        pid=${PIDS[$i]}
        kill -0 "$pid" 2>/dev/null || continue
        kill -INT "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "${NAMES[$i]} (pid $pid) did not stop within 10 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
}
trap 'echo; echo "stopping…"; stop_all; exit 130' INT TERM
trap stop_all EXIT

started_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# The fleet's time runs an hour per --step-ms: silence is judged against the newest reading
# time the worker has seen (event time), every 5 s, not against the wall clock, or the silent
# meter would never be silent for three usual intervals (docs/detectors.md).
"$BIN/pipeline" run --control --control-arrears --calendar "$RUN_DIR/calendar.toml" \
    --sweep-clock event-time --sweep-interval-s 5 \
    --metrics-listen "$PIPELINE_METRICS" >"$RUN_DIR/pipeline.log" 2>&1 &
started $! pipeline
"$BIN/gateway" run --config demo/gateway.toml >"$RUN_DIR/gateway.log" 2>&1 &
started $! gateway
# GET /metrics of HOST:PORT over bash's /dev/tcp (no curl needed); the body only.
metrics_of() (
    exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || exit 1
    printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
    sed '1,/^\r\{0,1\}$/d' <&3
) 2>/dev/null
metrics() { metrics_of 127.0.0.1:9464; }
for _ in $(seq 1 50); do metrics >/dev/null && break; sleep 0.2; done
metrics >/dev/null || { echo "gateway did not start; see $RUN_DIR/gateway.log" >&2; tail -n 20 "$RUN_DIR/gateway.log" >&2; exit 1; }

# --- the registry: the simulated fleet imported as a utility's ledger (docs/registry.md) ---
# Books first (one per DMA), then the fleet's CSV written by the simulator from the same
# scenario and transport split it runs; `registry sync` publishes the gateway's device set and
# records its status and health while the demo runs.
for d in 0 1; do
    "$BIN/pipeline" registry --actor run-demo.sh book --code "BOOK-$d" --name "DMA $d readers" \
        --reader "reader-$d" --cycle monthly >/dev/null
done
"$BIN/simulate" registry-csv "$RUN_DIR/scenario.toml" --gateway gw-demo \
    --coap-meters "$coap" --http-meters "$http" --concentrator-meters "$conc" \
    --wmbus-meters "$wmbus" --hydrants "$HYDRANTS" --wmbus-dma-inlets >"$RUN_DIR/registry.csv"
"$BIN/pipeline" registry --actor run-demo.sh import --dry-run "$RUN_DIR/registry.csv"
"$BIN/pipeline" registry --actor run-demo.sh import "$RUN_DIR/registry.csv"
"$BIN/pipeline" registry sync --republish-s 10 >"$RUN_DIR/registry-sync.log" 2>&1 &
started $! "registry sync"
meter_of() { awk -F, -v no="$(printf 'WM%07d' "$1")" '$1 == no { print $2 }' "$RUN_DIR/registry.csv"; }
account_of() { awk -F, -v no="$(printf 'WM%07d' "$1")" '$1 == no { print $8 }' "$RUN_DIR/registry.csv"; }

# --- control: a hydrant permit and a customer in arrears (docs/control.md) ----------------
# hyd-0000 may be used by the fire brigade for the whole run: unlocked through the permit;
# hyd-0001 is opened without one at hour 12 (simulate --hydrant-illegal-use).
"$BIN/pipeline" control permit create --id P-DEMO-1 --hydrant hydrant:hyd-0000 \
    --holder "Fire brigade drill" --from "$(at 0)" --to "$end_at" --volume-limit 30 \
    --by user:run-demo >/dev/null
# The arrears rule's safeguards: payment demand after the overdue date, advance notice,
# notice period (5 days) elapsed, working hours; the meter has a valve and is not protected.
arrears_meter=$(meter_of "$ARREARS")
"$BIN/pipeline" record-arrears --meter "$arrears_meter" --account "$(account_of "$ARREARS")" \
    --amount 356.40 --overdue-since "$(date -u -d '40 days ago' +%Y-%m-%d)" --actor run-demo.sh
"$BIN/pipeline" control notice --meter "$arrears_meter" --kind payment-demand \
    --sent-at "$(date -u -d '30 days ago' +%Y-%m-%dT%H:%M:%SZ)" --by user:clerk >/dev/null
"$BIN/pipeline" control notice --meter "$arrears_meter" --kind advance-notice \
    --sent-at "$(date -u -d '7 days ago' +%Y-%m-%dT%H:%M:%SZ)" --by user:clerk >/dev/null

# --- scheduler and API --------------------------------------------------------------------
"$BIN/pipeline" scheduler run --node run-demo --tick-s 10 >"$RUN_DIR/scheduler.log" 2>&1 &
started $! scheduler
# A fresh HS256 secret per run: tokens of an earlier run are not accepted.
API_JWT_SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
export API_JWT_SECRET
"$BIN/api" serve --listen "$LISTEN" --migrate --tariff tariffs/nanan-2025.toml \
    >"$RUN_DIR/api.log" 2>&1 &
started $! api
for _ in $(seq 1 100); do wm_tcp_open "${LISTEN%:*}" "${LISTEN##*:}" && break; sleep 0.2; done
wm_tcp_open "${LISTEN%:*}" "${LISTEN##*:}" || { echo "api did not start; see $RUN_DIR/api.log" >&2; tail -n 20 "$RUN_DIR/api.log" >&2; exit 1; }

# --- demo credentials per role ------------------------------------------------------------
ROLES=(meter_operator meter_admin meter_reader billing auditor integration)
creds="$RUN_DIR/credentials.txt"
( umask 077; : >"$creds" )
dashboard="http://$LISTEN/"
if "$BIN/api" user-add --help >/dev/null 2>&1; then
    # Dashboard users (POST /api/v1/auth/login): one per role, a fresh password each run.
    for role in "${ROLES[@]}"; do
        user="demo-${role//_/-}"
        pass=$(od -An -tx1 -N9 /dev/urandom | tr -d ' \n')
        "$BIN/api" user-add --username "$user" --password "$pass" --role "$role" >/dev/null
        printf '%-15s user %-22s password %s\n' "$role" "$user" "$pass" >>"$creds"
    done
else
    # This build's api has no users (nor dashboard) yet: bearer tokens per role (8 h) for the
    # API instead.
    dashboard="(none in this build: no \`api user-add\`) — API docs below"
    for role in "${ROLES[@]}"; do
        token=$("$BIN/api" dev-token --role "$role" --sub "demo-$role" --ttl 28800)
        printf '%-15s bearer token %s\n' "$role" "$token" >>"$creds"
    done
fi

cat <<EOF

=== water-meter demo running ===
dashboard: $dashboard
API docs:  http://$LISTEN/api/v1/docs
credentials per role (also in $creds):
$(cat "$creds")
fleet: $METERS meters ($coap CoAP, $http HTTP push, $conc via 4 concentrators, $wmbus wM-Bus),
       2 DMAs with inlet bulk meters (wM-Bus) and pressure transmitters (Modbus), $HYDRANTS hydrants (permit P-DEMO-1 on hyd-0000)
faults: leak on $(meter_of "$LEAK") (from $(at 2)), burst on $(meter_of "$BURST") ($(at 10)..$(at 15), auto-close valve),
        silent $(meter_of "$SILENT") (from $(at 20)), hydrant:hyd-0001 opened illegally at $(at 12),
        $arrears_meter in arrears (356.40 yuan, notices sent)
gateway metrics: http://127.0.0.1:9464/metrics   pipeline metrics: http://$PIPELINE_METRICS/metrics
logs: $RUN_DIR/{pipeline,gateway,registry-sync,scheduler,api,simulate}.log
EOF
if [ -z "$DURATION" ]; then
    echo "history: $steps hours at ${STEP_MS} ms each, then live hourly readings. Ctrl-C stops everything."
else
    echo "bounded run: $steps steps of ${STEP_MS} ms, then the summary."
fi
echo

# --- the fleet ------------------------------------------------------------------------------
fleet_args=(
    --scenario "$RUN_DIR/scenario.toml" --step-ms "$STEP_MS"
    --gateway-coap 127.0.0.1:5683 --coap-meters "$coap" --coap-key-seed "$NBIOT_KEY_SEED"
    --gateway-http 127.0.0.1:8088 --http-secret demo-push-secret-2026 --http-meters "$http"
    --mqtt "$MQTT_URL" --concentrators 4 --concentrator-meters "$conc" --upload-every-step
    --hydrants "$HYDRANTS" --hydrant-illegal-use 1@12
    --gateway-wmbus 127.0.0.1:9011 --wmbus-meters "$wmbus" --wmbus-clear --wmbus-dma-inlets
    --modbus-bind 127.0.0.1:5020
)
# Unlock the permitted hydrant once the fleet (and its hydrant controllers) are up.
( sleep 5; "$BIN/pipeline" control permit unlock --id P-DEMO-1 --by user:run-demo \
    >>"$RUN_DIR/permit-unlock.log" 2>&1 || echo "permit unlock failed: see $RUN_DIR/permit-unlock.log" >&2 ) &
unlock_pid=$!
if [ -z "$DURATION" ]; then
    "$BIN/simulate" demo "${fleet_args[@]}" --not-ahead-of-clock >"$RUN_DIR/simulate.log" 2>&1 &
    started $! simulate
    wait "$unlock_pid" 2>/dev/null || true
    # Until Ctrl-C (the trap stops everything) or until a child dies.
    while :; do
        for i in "${!PIDS[@]}"; do
            if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
                echo "${NAMES[$i]} stopped; see $RUN_DIR/*.log. Stopping the rest." >&2
                stop_all
                exit 1
            fi
        done
        sleep 2
    done
fi

sim_started=$(date +%s%N)
"$BIN/simulate" demo "${fleet_args[@]}" --max-steps "$steps" >"$RUN_DIR/simulate.log" 2>&1 &
sim_pid=$!
started "$sim_pid" simulate
# The fleet may fall behind its pace on a small machine; it gets 60 s more than planned.
( sleep $(( DURATION + 60 )); kill -INT "$sim_pid" 2>/dev/null ) &
guard_pid=$!
wait "$sim_pid" || echo "simulate ended with status $? (see $RUN_DIR/simulate.log)"
kill "$guard_pid" 2>/dev/null || true
wait "$guard_pid" 2>/dev/null || true
wait "$unlock_pid" 2>/dev/null || true
sim_ms=$(( ($(date +%s%N) - sim_started) / 1000000 ))

# Let the gateway drain its spool and the pipeline commit what is in flight; give the control
# service a few sweeps (burst close, arrears run, telemetry confirmation).
for _ in $(seq 1 60); do
    depth=$(metrics | awk '/^wm_gateway_spool_depth /{print $2}')
    [ "${depth:-1}" = "0" ] && break
    sleep 1
done
sleep 5

# --- summary ----------------------------------------------------------------------------
q() { psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 "$@"; }
echo
echo "=== simulated fleet (simulate demo) ==="
sed -n '/^FrameCounts {$/,/^}$/p' "$RUN_DIR/simulate.log"
# The database is this run's alone (recreated above): every row counts, no time filter.
echo "=== readings stored by quantity and quality ==="
q -c "SELECT quantity, quality, count(*) AS readings FROM readings GROUP BY 1, 2 ORDER BY 1, 2"
q -c "SELECT source, count(DISTINCT meter_id) AS meters_seen, count(*) AS readings,
             count(*) FILTER (WHERE quality = 'rejected') AS rejected,
             count(*) FILTER (WHERE quality = 'estimated') AS estimated
      FROM readings GROUP BY ROLLUP (source) ORDER BY source NULLS LAST"
q -c "SELECT quality_detail->>'reason' AS reject_reason, count(*) FROM readings
      WHERE quality = 'rejected' GROUP BY 1 ORDER BY 2 DESC"
q -c "SELECT kind AS ingest_reject, count(*) FROM ingest_rejects GROUP BY 1"
echo "=== registry ==="
q -c "SELECT role, status, count(*) AS meters, count(*) FILTER (WHERE has_valve) AS valves,
             count(*) FILTER (WHERE auto_close_on_burst) AS auto_close,
             count(*) FILTER (WHERE protected_customer) AS protected
      FROM meters GROUP BY 1, 2 ORDER BY 1, 2"
"$BIN/pipeline" registry gateways || true
echo "=== alarms raised by kind ==="
q -c "SELECT kind, count(*) AS raised, count(*) FILTER (WHERE cleared_at IS NULL) AS open,
             count(DISTINCT meter_id) AS meters FROM alarms GROUP BY 1 ORDER BY 1"
echo "=== the scripted faults ==="
q -c "SELECT f.fault, f.meter_id, coalesce(string_agg(DISTINCT a.kind, ', '), '(none)') AS alarms
      FROM (VALUES ('leak', '$(meter_of "$LEAK")'), ('burst', '$(meter_of "$BURST")'),
                   ('silent', '$(meter_of "$SILENT")'), ('hydrant illegal use', 'hydrant:hyd-0001'),
                   ('arrears', '$arrears_meter')) AS f (fault, meter_id)
      LEFT JOIN alarms a USING (meter_id) GROUP BY 1, 2 ORDER BY 1"
echo "=== commands by state, control decisions ==="
q -c "SELECT action->>'type' AS action, state, count(*) FROM commands GROUP BY 1, 2 ORDER BY 1, 2"
q -c "SELECT rule, outcome, reason, count(*) AS meters, min(meter_id) AS first_meter
      FROM control_decisions GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
# Counters and the table read together (the pipeline keeps committing while the summary runs).
gw_metrics=$(metrics)
pl_metrics=$(metrics_of "$PIPELINE_METRICS")
stored=$(q -A -t -c "SELECT count(*) FROM readings WHERE quality <> 'estimated'")
echo "=== gateway metrics (excerpt) ==="
grep -E '^wm_gateway_(frames_total|decode_errors_total|spool_depth|uplink|commands_total)' <<<"$gw_metrics" | head -n 40 || true
echo "=== pipeline metrics (excerpt) ==="
grep -E '^pipeline_(messages|entries_seq_duplicate|readings|batches_gap|commits_total|ingest_acks)' <<<"$pl_metrics" || true
# The readings' ledger, read together after the drain (the pipeline keeps committing while
# the summary runs). From the gateway's spool to the table, every reading is in one place:
#   issued  = spool sequence numbers issued this run (the spool starts empty: next_seq - 1)
#           = acknowledged (distinct readings the pipeline confirmed) + spool depth + evicted
#   at the pipeline, each distinct spooled reading it committed is stored (a row not
#   estimated: actual, validated or rejected) or dropped as a duplicate (by VEE's memory or,
#   pipeline_readings_already_stored_total, by the store's merge), a conflict,
#   unstorable or of a wrong partition; what it has not committed yet is "in flight" (still
#   in the spool, or published and not yet committed). Re-sent copies of committed readings
#   (pipeline_entries_seq_duplicate_total) are dropped by sequence and counted nowhere else.
# Not in the ledger: frames the gateway refused before its spool (decode errors, failed
# authentication, its own duplicate filter: wm_gateway_frames_total / decode_errors_total)
# and the pipeline's own estimates (rows of quality 'estimated').
gw() { awk -v k="$1" '$1 == k { n = $2 } END { printf "%d", n }' <<<"$gw_metrics"; }
pl() { awk -v k="$1" '$1 == k { n = $2 } END { printf "%d", n }' <<<"$pl_metrics"; }
acked=$(gw wm_gateway_uplink_acked_readings_total)
spooled=$(gw wm_gateway_spool_depth)
evicted=$(gw wm_gateway_spool_evicted_total)
next_seq=$(gw wm_gateway_spool_next_seq)
issued=$(( ${next_seq:-1} - 1 ))
dups=$(( $(pl pipeline_readings_duplicate_total) + $(pl pipeline_readings_already_stored_total) )); conflicts=$(pl pipeline_readings_conflict_total)
unstorable=$(pl pipeline_readings_unstorable_total); wrongp=$(pl pipeline_readings_wrong_partition_total)
resent=$(pl pipeline_entries_seq_duplicate_total)
committed=$(( stored + ${dups:-0} + ${conflicts:-0} + ${unstorable:-0} + ${wrongp:-0} ))
in_flight=$(( issued - ${evicted:-0} - committed ))
echo "=== result ==="
echo "readings spooled by the gateway: $issued = acknowledged by the pipeline ${acked:-?} + still in its spool ${spooled:-?} + evicted ${evicted:-?}"
echo "  at the pipeline: stored $stored + duplicates ${dups:-?} + conflicts ${conflicts:-?} + unstorable ${unstorable:-?} + wrong partition ${wrongp:-?} = $committed committed;"
echo "  in flight (spooled, not committed yet): $in_flight; committed, acknowledgement not back yet: $(( committed - ${acked:-0} ))"
echo "  re-sent copies dropped by sequence (not counted above): ${resent:-?}"
if [ "$(( ${acked:-0} + ${spooled:-0} + ${evicted:-0} ))" != "$issued" ] || [ "$in_flight" -lt 0 ] \
    || [ "$in_flight" -gt "${spooled:-0}" ]; then
    echo "  the ledger does not balance (counters read a moment apart, or a reading lost): see the logs" >&2
fi
echo "readings stored (not estimates, rejected included): $stored in $(( sim_ms / 1000 )) s of fleet time ($(( stored * 1000 / (sim_ms + 1) )) readings/s)"
echo "logs: $RUN_DIR/{pipeline,gateway,registry-sync,scheduler,api,simulate}.log"
[ "$stored" -gt 0 ] || { echo "no readings arrived" >&2; exit 1; }
