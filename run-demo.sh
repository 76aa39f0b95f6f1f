#!/usr/bin/env bash
# The README's main job: the whole stack with a simulated fleet, on defaults.
#
# Installs what is missing and starts PostgreSQL and Mosquitto when they are not answering
# (scripts/services.sh, shared with .ci/run), builds the release binaries,
# applies the schema, runs `pipeline run` and `gateway run --config demo/gateway.toml` in the
# background, drives a simulated fleet of a few thousand meters against the gateway for about
# a minute and a half (`simulate demo`), then prints what reached the database. Exits 0 only
# when readings of this run were stored.
#
# Environment overrides (defaults in brackets):
#   DEMO_METERS [3000]  meters in the fleet        DEMO_SECONDS [90]  length of the run
#   DEMO_STEP_MS [1000] real ms per simulated hour  DEMO_DATABASE [wm_demo] (recreated on the
#   server of DATABASE_URL)                          MQTT_URL, RUST_LOG
set -euo pipefail
cd "$(dirname "$0")"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export MQTT_URL="${MQTT_URL:-mqtt://127.0.0.1:1883}"
export RUST_LOG="${RUST_LOG:-info}"
METERS="${DEMO_METERS:-3000}"
SECONDS_RUN="${DEMO_SECONDS:-90}"
STEP_MS="${DEMO_STEP_MS:-1000}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/release"
RUN_DIR="target/demo"
DEMO_DB="${DEMO_DATABASE:-wm_demo}"

# --- services ---------------------------------------------------------------------------
# Installs what is missing (Debian packages, rustup components) and starts PostgreSQL and
# Mosquitto when they are not answering; shared with .ci/run.
# shellcheck source=scripts/services.sh
. scripts/services.sh
wm_install_tools
wm_start_services

# --- build and schema -------------------------------------------------------------------
cargo build -j 2 --release -p pipeline -p gateway -p simulators
# The demo runs in its own database, recreated each time: a re-run within the same hour would
# otherwise send the same (meter, time) readings again and store nothing new.
psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 \
    -c "DROP DATABASE IF EXISTS \"$DEMO_DB\" WITH (FORCE)" -c "CREATE DATABASE \"$DEMO_DB\""
export DATABASE_URL="${DATABASE_URL%/*}/$DEMO_DB"
"$BIN/pipeline" migrate
mkdir -p "$RUN_DIR"
# --- the fleet --------------------------------------------------------------------------
# One step = one simulated hour. Readings end at the current hour, so none lies in the
# future for the pipeline's validation.
steps=$(( SECONDS_RUN * 1000 / STEP_MS ))
start_epoch=$(( $(date -u +%s) / 3600 * 3600 - steps * 3600 ))
wmbus=$(( METERS / 10 ))
coap=$(( METERS * 25 / 100 ))
http=$(( METERS * 10 / 100 ))
conc=$(( METERS - wmbus - coap - http ))
cat >"$RUN_DIR/scenario.toml" <<EOF
name = "run-demo"
description = "run-demo.sh: $METERS meters, $steps hourly steps ending now"
seed = 1
start = "$(date -u -d "@$start_epoch" +%Y-%m-%dT%H:%M:%SZ)"
days = $(( steps / 24 + 1 ))

[fleet]
households = $(( METERS - METERS / 10 ))
commercial = $(( METERS / 10 ))
dmas = 2
background_loss_lph = 300.0
mbus_meters = $wmbus
EOF
# The CoAP meters authenticate (demo/gateway.toml: auth = "frame_mac"): each has its own key,
# derived here from a seed the simulator shares; the gateway reads them from the key file.
NBIOT_KEY_SEED="${DEMO_NBIOT_KEY_SEED:-demo-nbiot-key-seed-2026}"
( umask 077; "$BIN/simulate" nbiot-keys --scenario "$RUN_DIR/scenario.toml" \
    --key-seed "$NBIOT_KEY_SEED" >"$RUN_DIR/nbiot-keys.toml" )
"$BIN/gateway" check-config demo/gateway.toml

# --- the stack in the background ----------------------------------------------------------
rm -rf "$RUN_DIR/spool"   # demo/gateway.toml spools here; each run starts empty
PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    done
}
trap stop_all EXIT

started_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
"$BIN/pipeline" run >"$RUN_DIR/pipeline.log" 2>&1 &
PIDS+=($!)
"$BIN/gateway" run --config demo/gateway.toml >"$RUN_DIR/gateway.log" 2>&1 &
PIDS+=($!)
# GET /metrics over bash's /dev/tcp (no curl needed); the body only.
metrics() (
    exec 3<>/dev/tcp/127.0.0.1/9464 || exit 1
    printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
    sed '1,/^\r\{0,1\}$/d' <&3
) 2>/dev/null
for _ in $(seq 1 50); do metrics >/dev/null && break; sleep 0.2; done
metrics >/dev/null || { echo "gateway did not start; see $RUN_DIR/gateway.log" >&2; tail -n 20 "$RUN_DIR/gateway.log" >&2; exit 1; }

# --- the registry: the simulated fleet imported as a utility's ledger (docs/registry.md) ---
# Books first (one per DMA), then the fleet's CSV written by the simulator from the same
# scenario and transport split it runs; `registry sync` publishes the gateway's device set and
# records its status while the demo runs.
for d in 0 1; do
    "$BIN/pipeline" registry --actor run-demo.sh book --code "BOOK-$d" --name "DMA $d readers" \
        --reader "reader-$d" --cycle monthly >/dev/null
done
"$BIN/simulate" registry-csv "$RUN_DIR/scenario.toml" --gateway gw-demo \
    --coap-meters "$coap" --http-meters "$http" --concentrator-meters "$conc" \
    --wmbus-meters "$wmbus" >"$RUN_DIR/registry.csv"
"$BIN/pipeline" registry --actor run-demo.sh import --dry-run "$RUN_DIR/registry.csv"
"$BIN/pipeline" registry --actor run-demo.sh import "$RUN_DIR/registry.csv"
"$BIN/pipeline" registry sync --republish-s 10 >"$RUN_DIR/registry-sync.log" 2>&1 &
PIDS+=($!)

echo "fleet: $METERS meters ($coap CoAP, $http HTTP push, $conc via 4 concentrators, $wmbus wM-Bus)," \
     "5 hydrants, 4 Modbus instruments; $steps steps of ${STEP_MS} ms"
sim_started=$(date +%s%N)
timeout --signal=INT "$(( SECONDS_RUN + 120 ))" "$BIN/simulate" demo \
    --scenario "$RUN_DIR/scenario.toml" --step-ms "$STEP_MS" --max-steps "$steps" \
    --gateway-coap 127.0.0.1:5683 --coap-meters "$coap" --coap-key-seed "$NBIOT_KEY_SEED" \
    --gateway-http 127.0.0.1:8088 --http-secret demo-push-secret-2026 --http-meters "$http" \
    --mqtt "$MQTT_URL" --concentrators 4 --concentrator-meters "$conc" --upload-every-step \
    --hydrants 5 \
    --gateway-wmbus 127.0.0.1:9011 --wmbus-meters "$wmbus" --wmbus-clear \
    --modbus-bind 127.0.0.1:5020 \
    >"$RUN_DIR/simulate.log" 2>&1 || echo "simulate ended with status $? (see $RUN_DIR/simulate.log)"
sim_ms=$(( ($(date +%s%N) - sim_started) / 1000000 ))

# Let the gateway drain its spool and the pipeline commit what is in flight.
for _ in $(seq 1 60); do
    depth=$(metrics | awk '/^wm_gateway_spool_depth /{print $2}')
    [ "${depth:-1}" = "0" ] && break
    sleep 1
done
sleep 3

# --- summary ----------------------------------------------------------------------------
q() { psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 "$@"; }
since="received_at >= '$started_at'"
echo
echo "=== simulated fleet (simulate demo) ==="
sed -n '/^FrameCounts {$/,/^}$/p' "$RUN_DIR/simulate.log"
echo "=== readings stored by quantity and quality (received since $started_at) ==="
q -c "SELECT quantity, quality, count(*) AS readings FROM readings WHERE $since GROUP BY 1, 2 ORDER BY 1, 2"
q -c "SELECT source, count(DISTINCT meter_id) AS meters_seen, count(*) AS readings,
             count(*) FILTER (WHERE quality = 'rejected') AS rejected,
             count(*) FILTER (WHERE quality = 'estimated') AS estimated
      FROM readings WHERE $since GROUP BY ROLLUP (source) ORDER BY source NULLS LAST"
q -c "SELECT quality_detail->>'reason' AS reject_reason, count(*) FROM readings
      WHERE $since AND quality = 'rejected' GROUP BY 1 ORDER BY 2 DESC"
q -c "SELECT kind AS ingest_reject, count(*) FROM ingest_rejects WHERE at >= '$started_at' GROUP BY 1"
echo "=== registry ==="
q -c "SELECT role, status, count(*) AS meters, count(*) FILTER (WHERE has_valve) AS valves,
             count(*) FILTER (WHERE auto_close_on_burst) AS auto_close,
             count(*) FILTER (WHERE protected_customer) AS protected
      FROM meters GROUP BY 1, 2 ORDER BY 1, 2"
"$BIN/pipeline" registry gateways || true
echo "=== gateway metrics (excerpt) ==="
metrics | grep -E '^wm_gateway_(frames_total|decode_errors_total|spool_depth|uplink|commands_total)' | head -n 40 || true
stored=$(q -A -t -c "SELECT count(*) FROM readings WHERE $since AND quality <> 'estimated'")
acked=$(metrics | awk '/^wm_gateway_uplink_acked_readings_total /{print $2}')
echo "=== result ==="
# Fewer stored than published: exact re-sends deduplicated by the row key, and messages the
# broker dropped for a slow subscriber (Mosquitto's max_queued_messages, see its log).
echo "readings published by the gateway (broker-acknowledged): ${acked:-?}"
echo "readings stored: $stored in $(( sim_ms / 1000 )) s of fleet time ($(( stored * 1000 / (sim_ms + 1) )) readings/s)"
echo "logs: $RUN_DIR/{pipeline,gateway,simulate}.log"
[ "$stored" -gt 0 ] || { echo "no readings arrived" >&2; exit 1; }
