#!/usr/bin/env bash
# make demo: a real Envoy 1.40.0 with the envoy-obs JSON access logger in front of a small
# Python upstream; sends mixed traffic and shows the log lines and the logger's counters.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
ENVOY=$("$PY" -c 'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")')
WORK=$ROOT/.work/demo
rm -rf "$WORK"; mkdir -p "$WORK/www/api"
echo '{"hello": "from the upstream"}' > "$WORK/www/api/index.html"

port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LISTEN=$(port); UP=$(port); ADMIN=$(port)
LOG=$WORK/access.log
sed -e "s#@MODULE_DIR@#$ROOT/target/release#" -e "s#@LOG_PATH@#$LOG#" -e "s#@LISTEN_PORT@#$LISTEN#" \
    -e "s#@UPSTREAM_PORT@#$UP#" -e "s#@ADMIN_PORT@#$ADMIN#" examples/json-access-log/envoy.yaml > "$WORK/envoy.yaml"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

(cd "$WORK/www" && exec "$PY" -m http.server "$UP" --bind 127.0.0.1 >"$WORK/upstream.log" 2>&1) & pids+=($!)
"$ENVOY" -c "$WORK/envoy.yaml" --concurrency 2 --use-dynamic-base-id -l info >"$WORK/envoy.log" 2>&1 & pids+=($!)
ENVOY_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ADMIN/ready" >/dev/null && break; sleep 0.1; done
grep -h "ABI version" "$WORK/envoy.log" | sed 's/^.*\] /envoy: /'

echo "== traffic: 40 x GET /api/, 3 x 404, 3 x 503 (upstream down), 2 x HTTP/2, 1 x traceparent"
B=http://127.0.0.1:$LISTEN
for i in $(seq 40); do curl -s -o /dev/null "$B/api/"; done
for i in 1 2 3; do curl -s -o /dev/null "$B/nope/$i"; curl -s -o /dev/null "$B/broken"; done
for i in 1 2; do curl -s -o /dev/null --http2-prior-knowledge "$B/api/?h2=$i"; done
curl -s -o /dev/null -H 'traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' "$B/api/"

for _ in $(seq 50); do
  written=$(curl -s "http://127.0.0.1:$ADMIN/stats?filter=access_log.json.records_written" | awk '{print $2}')
  filtered=$(curl -s "http://127.0.0.1:$ADMIN/stats?filter=access_log.json.records_filtered" | awk '{print $2}')
  [ $(( ${written:-0} + ${filtered:-0} )) -ge 49 ] && break; sleep 0.1
done

echo; echo "== the last log lines ($LOG), one JSON object per line:"
tail -n 6 "$LOG"
echo; echo "== status codes in the log (every 4xx/5xx kept, ~50% of 2xx sampled by x-request-id):"
"$PY" - "$LOG" <<'PYEOF'
import collections, json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
print("  ", dict(sorted(collections.Counter(r["response_code"] for r in recs).items())), f"({len(recs)} lines, all valid JSON)")
t = [r for r in recs if r["trace_id"]]
print("   trace context read from traceparent:", t[0]["trace_id"], t[0]["span_id"]) if t else None
PYEOF
echo; echo "== the logger's counters in Envoy's /stats:"
curl -s "http://127.0.0.1:$ADMIN/stats?filter=obs\\.access_log" | sed 's/^/   /'
curl -s -X POST "http://127.0.0.1:$ADMIN/quitquitquit" >/dev/null
wait "$ENVOY_PID" || true
echo; echo "Envoy stopped cleanly; config and logs are in $WORK"
