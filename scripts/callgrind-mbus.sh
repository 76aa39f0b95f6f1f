#!/usr/bin/env bash
# Instructions per frame of `mbus::decode` (the public API, every record then read, as
# m-bus-parser's records are iterated), `mbus::readings` (the gateway's
# wired M-Bus path) and of the m-bus-parser crate on the libmbus corpus frames both accept, counted by callgrind: the count
# does not depend on the machine's load, so their ratio is the load-independent speed ratio.
#
#   scripts/callgrind-mbus.sh [passes]     (default 200)
#
# Each path runs twice under callgrind, with 0 and with `passes` passes over the frames; the
# difference of the totals (setup and corpus loading cancel out) over passes × frames is the
# figure. Needs valgrind and the conformance corpus (see decoders/CONFORMANCE.md).
set -euo pipefail
passes=${1:-200}
cd "$(dirname "$0")/.."
bin=$(cargo bench -p decoders --bench mbus_corpus --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "mbus_corpus" and m.get("executable"):
        print(m["executable"])')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
total() { # path passes -> total instructions (Ir)
    MBUS_CORPUS_CALLGRIND="$1:$2" valgrind --tool=callgrind --callgrind-out-file="$out/cg.$1.$2" \
        "$bin" >"$out/stdout.$1.$2" 2>/dev/null
    grep -E '^(summary|totals):' "$out/cg.$1.$2" | head -1 | awk '{print $2}'
}
frames=
declare -A per_frame
for path in ours gateway theirs; do
    zero=$(total "$path" 0)
    many=$(total "$path" "$passes")
    frames=$(sed -nE 's/.* passes over ([0-9]+) frames.*/\1/p' "$out/stdout.$path.$passes")
    per_frame[$path]=$(( (many - zero) / (passes * frames) ))
    echo "$path: $(( many - zero )) instructions for $passes passes x $frames frames = ${per_frame[$path]} per frame"
done
python3 -c "print(f'ratio (m-bus-parser / mbus::decode instructions): {${per_frame[theirs]} / ${per_frame[ours]}:.2f}x')"
python3 -c "print(f'ratio (m-bus-parser / mbus::readings instructions): {${per_frame[theirs]} / ${per_frame[gateway]}:.2f}x')"
