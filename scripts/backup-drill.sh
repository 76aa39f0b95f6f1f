#!/usr/bin/env bash
# Backup and restore drill (docs/operations.md, "Backups"): a private PostgreSQL cluster with WAL
# archiving gets the schema, a meter book with reads and a bill run; a base backup is taken, more
# reads, arrears and a second bill run follow (so the restore needs the archived WAL), and the
# tariff files and gateway configuration are archived beside it. Then the primary is destroyed,
# the backup restored into a fresh cluster by replaying the archive, and the drill checks that
# every table's row count and a digest of every bill match, that the configuration archive's
# checksums hold, and that re-running both bill runs on the restored cluster with the restored
# tariff recomputes every bill identically (`unchanged`, no new bill, no adjustment).
#
#   bash scripts/backup-drill.sh            # uses target/debug/pipeline (builds it if missing)
#   PIPELINE_BIN=target/release/pipeline KEEP=1 bash scripts/backup-drill.sh
#
# Exits non-zero, naming the difference, when anything does not match (`DRILL_SABOTAGE=lose-last-wal`
# deletes the newest archived WAL segment before the restore, so the drill must fail: CI runs
# that too). Runs as root (through
# runuser) or as the postgres user; touches nothing of the shared cluster on port 5432.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[drill] %s\n' "$*"; }
fail() { printf '[drill] FAILED: %s\n' "$*" >&2; exit 1; }

PGBIN="${PGBIN:-/usr/lib/postgresql/$(ls /usr/lib/postgresql | sort -V | tail -1)/bin}"
[ -x "$PGBIN/initdb" ] || fail "no PostgreSQL server binaries in $PGBIN (set PGBIN)"
PIPELINE_BIN="${PIPELINE_BIN:-target/debug/pipeline}"
if [ ! -x "$PIPELINE_BIN" ]; then
    log "building the pipeline binary"
    cargo build -q -p pipeline --bin pipeline
fi
PIPELINE_BIN="$(realpath "$PIPELINE_BIN")"
BOOK=DRILL-1
METERS="${DRILL_METERS:-200}"
TARIFF_FILE=tariffs/nanan-2025.toml
GATEWAY_CONFIG=demo/gateway.toml

WORK="$(mktemp -d /tmp/wm-backup-drill.XXXXXX)"
PRIMARY_PORT=$((50000 + RANDOM % 5000))
RESTORED_PORT=$((PRIMARY_PORT + 1))
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
cleanup() {
    for d in primary restored; do
        [ -f "$WORK/$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/$d" -m immediate stop >/dev/null 2>&1 || true
    done
    if [ "${KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
mkdir -p "$WORK/archive" "$WORK/config-backup"
[ "$(id -u)" = 0 ] && chown -R postgres: "$WORK"

start_cluster() { # dir port
    as_pg "$PGBIN/pg_ctl" -D "$WORK/$1" -l "$WORK/$1.log" -w -t 60 \
        -o "-p $2 -k $WORK -c listen_addresses=127.0.0.1" start >/dev/null ||
        { cat "$WORK/$1.log" >&2; fail "cluster $1 did not start"; }
}
sql() { # port sql
    psql -X -v ON_ERROR_STOP=1 -Atq -h 127.0.0.1 -p "$1" -U postgres -d wm -c "$2"
}
pipeline_at() { # port args...
    local port=$1
    shift
    DATABASE_URL="postgres://postgres@127.0.0.1:$port/wm" RUST_LOG=error "$PIPELINE_BIN" "$@"
}

log "primary cluster on port $PRIMARY_PORT with WAL archiving ($WORK)"
as_pg "$PGBIN/initdb" -D "$WORK/primary" -A trust -U postgres >/dev/null
cat >>"$WORK/primary/postgresql.conf" <<EOF
wal_level = replica
archive_mode = on
archive_command = 'test ! -f $WORK/archive/%f && cp %p $WORK/archive/%f'
EOF
start_cluster primary "$PRIMARY_PORT"
psql -X -q -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d postgres -c "CREATE DATABASE wm"
pipeline_at "$PRIMARY_PORT" migrate

# A meter book whose meters read hourly-ish over two months; each meter uses a different amount
# so the bills cover every tier of the tariff.
seed_reads() { # port first_day days
    sql "$1" "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source, received_at)
        SELECT format('cjt188:%s', lpad(m::text, 14, '0')), ts, 'volume',
               1000 + m * 0.01 + extract(epoch FROM ts - '2025-09-30 00:00+08') / 86400 * (0.2 + (m % 50) * 0.05),
               'm3', 'validated', 'meter', 'mqtt', ts + interval '5 s'
        FROM generate_series(1, $METERS) m,
             generate_series(timestamptz '$2 00:00+08', timestamptz '$2 00:00+08' + interval '$3 days' - interval '1 hour', interval '6 hours') ts
        ON CONFLICT DO NOTHING"
}
sql "$PRIMARY_PORT" "INSERT INTO meters (meter_id, protocol, meter_book)
    SELECT format('cjt188:%s', lpad(m::text, 14, '0')), 'cjt188', '$BOOK' FROM generate_series(1, $METERS) m"
# Reads past each cycle's end exist before its bill run, as in production (a bill closes on the
# read nearest the boundary; later reads there would rightly make an adjustment on a rerun).
seed_reads "$PRIMARY_PORT" 2025-09-30 63
bill_run() { # port from to tariff
    pipeline_at "$1" bill-run --book "$BOOK" --from "$2" --to "$3" --tariff "$4" --json
}
bill_run "$PRIMARY_PORT" 2025-10-01 2025-11-01 "$TARIFF_FILE" >"$WORK/run-oct.json"
grep -q "\"created\":$METERS," "$WORK/run-oct.json" || fail "October run did not bill every meter: $(cat "$WORK/run-oct.json")"

log "base backup, then more writes that only the archived WAL holds"
as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -D "$WORK/base" -X stream -c fast
seed_reads "$PRIMARY_PORT" 2025-12-02 31
pipeline_at "$PRIMARY_PORT" record-arrears --meter cjt188:00000000000007 --account DRILL-ACC-7 \
    --amount 88.50 --overdue-since 2025-11-01 >/dev/null
bill_run "$PRIMARY_PORT" 2025-11-01 2025-12-01 "$TARIFF_FILE" >"$WORK/run-nov.json"
# The configuration bills and gateways depend on, with checksums (bills reproduce only with the
# exact tariff file: its content hash is part of every bill's tariff_version).
cp "$TARIFF_FILE" "$GATEWAY_CONFIG" "$WORK/config-backup/"
(cd "$WORK/config-backup" && sha256sum -- * >SHA256SUMS)

# Every table's row count, and a digest of every bill and bill line: what a restore must give back.
snapshot() { # port
    sql "$1" "SELECT string_agg(format('%s=%s', c.relname,
                 (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I', c.relname), false, true, '')))[1]::text), ' ' ORDER BY c.relname)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
    sql "$1" "SELECT 'bills_digest=' || md5(string_agg(format('%s|%s|%s|%s|%s|%s', b.meter_id, b.revision, b.tariff_version, b.usage_m3, b.total, b.inputs_hash), ';' ORDER BY b.bill_id))
             FROM bills b"
    sql "$1" "SELECT 'lines_digest=' || md5(string_agg(format('%s|%s|%s|%s|%s', l.bill_id, l.line_no, l.component, l.volume_m3, l.amount), ';' ORDER BY l.bill_id, l.line_no))
             FROM bill_lines l"
}
snapshot "$PRIMARY_PORT" >"$WORK/before.txt"
sql "$PRIMARY_PORT" "SELECT pg_switch_wal()" >/dev/null
last_wal=$(sql "$PRIMARY_PORT" "SELECT pg_walfile_name(pg_current_wal_lsn())")
for _ in $(seq 1 100); do
    archived=$(sql "$PRIMARY_PORT" "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
    [[ "$archived" > "$last_wal" || "$archived" == "$last_wal" ]] && break
    # The segment holding the last writes is archived once it is switched out.
    sql "$PRIMARY_PORT" "SELECT pg_switch_wal()" >/dev/null
    sleep 0.2
done

log "primary lost (immediate stop, data directory removed)"
as_pg "$PGBIN/pg_ctl" -D "$WORK/primary" -m immediate stop >/dev/null
rm -rf "$WORK/primary"

if [ "${DRILL_SABOTAGE:-}" = lose-last-wal ]; then
    # The drill's own check: with the newest archived segment gone the restore must be caught.
    rm -f "$WORK/archive/$(ls "$WORK/archive" | grep -v '\.' | sort | tail -1)"
    log "sabotage: removed the newest archived WAL segment"
fi

log "restore: base backup + archived WAL into a fresh cluster on port $RESTORED_PORT"
cp -a "$WORK/base" "$WORK/restored"
cat >>"$WORK/restored/postgresql.conf" <<EOF
archive_mode = off
restore_command = 'cp $WORK/archive/%f %p'
EOF
as_pg touch "$WORK/restored/recovery.signal"
start_cluster restored "$RESTORED_PORT"
for _ in $(seq 1 300); do
    [ "$(sql "$RESTORED_PORT" "SELECT pg_is_in_recovery()" 2>/dev/null)" = f ] && break
    sleep 0.2
done
[ "$(sql "$RESTORED_PORT" "SELECT pg_is_in_recovery()")" = f ] || fail "restored cluster still in recovery"
snapshot "$RESTORED_PORT" >"$WORK/after.txt"
diff -u "$WORK/before.txt" "$WORK/after.txt" >&2 || fail "restored data differs from the primary's (diff above)"
(cd "$WORK/config-backup" && sha256sum --quiet -c SHA256SUMS) || fail "configuration archive corrupt"

log "bills recompute identically on the restored cluster with the restored tariff"
for cycle in "2025-10-01 2025-11-01" "2025-11-01 2025-12-01"; do
    # shellcheck disable=SC2086
    rerun=$(bill_run "$RESTORED_PORT" $cycle "$WORK/config-backup/$(basename "$TARIFF_FILE")")
    python3 - "$rerun" "$METERS" "$cycle" <<'EOF' || fail "bill rerun of $cycle on the restored cluster: $rerun"
import json, sys
r = json.loads(sys.argv[1]); meters = int(sys.argv[2])
assert r["created"] == 0 and r["adjusted"] == 0, r
assert r["unchanged"] == meters, (r["unchanged"], meters)
EOF
done
# The reruns add their own run records (bill_runs, audit_log); the bills themselves stay as they were.
snapshot "$RESTORED_PORT" | tail -n 2 >"$WORK/after-rerun.txt"
diff -u <(tail -n 2 "$WORK/before.txt") "$WORK/after-rerun.txt" >&2 || fail "a bill rerun changed the restored bills"

tables=$(head -1 "$WORK/before.txt" | wc -w)
readings=$(head -1 "$WORK/before.txt" | tr ' ' '\n' | sed -n 's/^reading_rows=//p')
bills=$(head -1 "$WORK/before.txt" | tr ' ' '\n' | sed -n 's/^bills=//p')
log "OK: $tables tables match ($readings readings, $bills bills, archive $(ls "$WORK/archive" | wc -l) WAL files); both bill runs recompute unchanged"
