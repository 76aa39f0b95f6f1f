#!/usr/bin/env bash
# IF-METER-004 load figure: batches of 500 signed reads against a running `api serve`
# (DATABASE_URL, API_JWT_SECRET set; Mosquitto up). Prints wrk's summary with latency
# percentiles; readings/s = requests/s × 500 (only 2xx count: check "Non-2xx").
# Usage: scripts/api-load.sh [requests] [duration_s] [connections]
set -euo pipefail
count=${1:-4000}
duration=${2:-10}
conns=${3:-8}
threads=2
api=${API_BIN:-target/release/api}
base=${API_BASE:-http://127.0.0.1:8080}
client=load-client
secret=load-client-secret-0001
"$api" client-add --id "$client" --secret "$secret"
file=$(mktemp)
trap 'rm -f "$file"' EXIT
"$api" load-requests --count "$count" --reads 500 --client "$client" --secret "$secret" > "$file"
API_LOAD_FILE=$file API_LOAD_THREADS=$threads API_LOAD_CLIENT=$client \
  wrk -t "$threads" -c "$conns" -d "${duration}s" --latency -s scripts/api-load.lua "$base"
echo "nproc: $(nproc)"
