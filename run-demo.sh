#!/usr/bin/env bash
# The README's main job: starts what the stack needs and runs it on defaults.
# At this stage (foundation) it starts PostgreSQL and Mosquitto and applies the schema; the
# gateway, simulated fleet and pipeline join as their issues land.
set -euo pipefail
cd "$(dirname "$0")"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export MQTT_URL="${MQTT_URL:-mqtt://127.0.0.1:1883}"
command -v pg_ctlcluster >/dev/null && command -v mosquitto >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql mosquitto socat >/dev/null
}
pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
(exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null || mosquitto -d -c /etc/mosquitto/mosquitto.conf
for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
cargo build --release -j 2 -p pipeline
./target/release/pipeline migrate
