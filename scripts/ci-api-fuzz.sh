#!/usr/bin/env bash
# CI's short OpenAPI fuzz run (issue 22): the debug `api` on a database of its own and a topic
# root of its own, schemathesis against its OpenAPI document (scripts/api-fuzz.sh), failing on
# any 5xx; the server and the database are removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
admin_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
db="wm_fuzz_$$"
port=$((41000 + RANDOM % 2000))
psql "$admin_url" -qc "CREATE DATABASE $db"
export DATABASE_URL="${admin_url%/*}/$db"
export API_JWT_SECRET="ci-fuzz-$RANDOM$RANDOM"
export API_LISTEN="127.0.0.1:$port" API_BASE="http://127.0.0.1:$port" TOPIC_ROOT="ci-fuzz/$$"
export API_TARIFFS="tariffs/nanan-2025.toml"
[ -x target/debug/api ] || cargo build -q -p api --bin api
target/debug/api serve --migrate >/tmp/wm-api-fuzz-$$.log 2>&1 &
api_pid=$!
cleanup() {
    kill "$api_pid" 2>/dev/null || true
    wait "$api_pid" 2>/dev/null || true
    psql "$admin_url" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT
for _ in $(seq 1 150); do
    curl -fsS "$API_BASE/healthz" >/dev/null 2>&1 && break
    kill -0 "$api_pid" 2>/dev/null || { cat /tmp/wm-api-fuzz-$$.log >&2; exit 1; }
    sleep 0.2
done
bash scripts/api-fuzz.sh "${1:-10}"
