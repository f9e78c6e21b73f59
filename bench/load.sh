#!/usr/bin/env bash
# Proxy load benchmark: llm-audit (full auditing: SQLite store, metrics, spans exported over
# OTLP to a local receiver) against nginx as a plain reverse proxy, both in front of the same
# fast fake upstream; and `bare`, the same axum/hyper/tokio stack forwarding with no auditing
# (examples/bare_proxy.rs), which splits llm-audit's cost into the stack's and the audit's.
# The proxies under test are pinned to CPU 0; load generator, upstream and span receiver to
# CPU 1. Prints a Markdown table. Bounded: about 4 minutes.
#
#   bench/load.sh            (DURATION=10 RATE=1000 to change the per-scenario run)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
RATE=${RATE:-1000}
P_UP=18080 P_PROXY=18081 P_NGINX=18082 P_BARE=18083 P_METRICS=19464 P_OTLP=14317

if ! command -v nginx >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
  (systemctl stop nginx || service nginx stop) >/dev/null 2>&1 || true
fi
cargo build -q --release --bin llm-audit --example bench_upstream --example loadgen --example otlp_sink \
  --example bare_proxy

REL=target/release
WORK=$(mktemp -d)
source bench/common.sh
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }                 # utime + stime, in clock ticks
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
HZ=$(getconf CLK_TCK)

taskset -c 1 "$REL/examples/bench_upstream" 127.0.0.1:$P_UP 2>"$WORK/upstream.log" & PIDS+=($!)
taskset -c 1 "$REL/examples/otlp_sink" 127.0.0.1:$P_OTLP 2>"$WORK/otlp.log" & PIDS+=($!)
wait_port $P_UP; wait_port $P_OTLP

OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$P_OTLP RUST_LOG=warn taskset -c 0 \
  "$REL/llm-audit" serve --listen 127.0.0.1:$P_PROXY --metrics-listen 127.0.0.1:$P_METRICS \
  --upstream http://127.0.0.1:$P_UP/v1 --db "$WORK/bench.db" 2>"$WORK/proxy.log" & PROXY=$!
PIDS+=($PROXY)
wait_port $P_PROXY

nginx_conf "$WORK/nginx.conf" "$WORK" $P_NGINX $P_UP "worker_processes 1;"
taskset -c 0 nginx -c "$WORK/nginx.conf" -p "$WORK" & PIDS+=($!)
wait_port $P_NGINX
sleep 0.5
NGINX_WORKER=$(pgrep -P "$(cat "$WORK/nginx.pid")" | head -1)
taskset -c 0 "$REL/examples/bare_proxy" 127.0.0.1:$P_BARE http://127.0.0.1:$P_UP 2>"$WORK/bare.log" & BARE=$!
PIDS+=($BARE)
wait_port $P_BARE

sleep 1
PROXY_IDLE_KB=$(rss_kb $PROXY)

# run NAME PORT PID ARGS… → one JSON line with cpu_us_per_req added
run() {
  local name=$1 port=$2 pid=$3; shift 3
  local t0=0 t1=0
  [ "$pid" != "-" ] && t0=$(ticks "$pid")
  local out
  out=$(taskset -c 1 "$REL/examples/loadgen" "http://127.0.0.1:$port/v1/chat/completions" --duration "$DURATION" "$@")
  [ "$pid" != "-" ] && t1=$(ticks "$pid")
  local reqs
  reqs=$(sed -E 's/.*"requests":([0-9]+).*/\1/' <<<"$out")
  local cpu
  cpu=$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.1f", d / hz / n * 1e6; else print "0" }')
  echo "$name ${out%\}},\"cpu_us_per_req\":$cpu}"
}

RESULTS="$WORK/results.txt"
for mode in json sse; do
  flag=""; [ $mode = sse ] && flag="--stream"
  run "direct-c1-$mode" $P_UP - --concurrency 1 $flag >>"$RESULTS"
  run "nginx-c1-$mode" $P_NGINX "$NGINX_WORKER" --concurrency 1 $flag >>"$RESULTS"
  run "bare-c1-$mode" $P_BARE $BARE --concurrency 1 $flag >>"$RESULTS"
  run "proxy-c1-$mode" $P_PROXY $PROXY --concurrency 1 $flag >>"$RESULTS"
  run "direct-rate-$mode" $P_UP - --rate "$RATE" $flag >>"$RESULTS"
  run "nginx-rate-$mode" $P_NGINX "$NGINX_WORKER" --rate "$RATE" $flag >>"$RESULTS"
  run "bare-rate-$mode" $P_BARE $BARE --rate "$RATE" $flag >>"$RESULTS"
  run "proxy-rate-$mode" $P_PROXY $PROXY --rate "$RATE" $flag >>"$RESULTS"
done
PROXY_PEAK_KB=$(hwm_kb $PROXY)
# Spans leave in batches at least every second: let the last one reach the sink before counting.
sleep 2.5
ROWS=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from audit_logs').fetchone()[0])" "$WORK/bench.db" 2>/dev/null || echo "?")
SPANS=$(grep -o '[0-9]*$' "$WORK/otlp.log" | tail -1)

python3 - "$RESULTS" "$PROXY_IDLE_KB" "$PROXY_PEAK_KB" "$ROWS" "${SPANS:-0}" <<'EOF'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    name, js = line.split(" ", 1)
    rows[name] = json.loads(js)
def added(kind, mode, key):
    return rows[f"{kind}-{mode}"][key] - rows[f"direct-{mode}"][key]
print("| scenario | p50 ms | p99 ms | first chunk p50/p99 ms | rps | errors | CPU µs/req |")
print("|---|---|---|---|---|---|---|")
for name, r in rows.items():
    print(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['first_chunk_p50_ms']:.3f} / {r['first_chunk_p99_ms']:.3f} | {r['rps']:.0f} | {r['errors']} | {r['cpu_us_per_req'] if not name.startswith('direct') else '-'} |")
print()
print("| added over direct | p50 ms | p99 ms | first chunk p50 ms | first chunk p99 ms |")
print("|---|---|---|---|---|")
for kind in ("nginx", "bare", "proxy"):
    for mode in ("c1-json", "c1-sse", "rate-json", "rate-sse"):
        print(f"| {kind} {mode} | {added(kind, mode, 'p50_ms'):.3f} | {added(kind, mode, 'p99_ms'):.3f} | "
              f"{added(kind, mode, 'first_chunk_p50_ms'):.3f} | {added(kind, mode, 'first_chunk_p99_ms'):.3f} |")
print()
print("| CPU per request ÷ nginx's | bare (stack only) | llm-audit (full audit) |")
print("|---|---|---|")
for mode in ("c1-json", "c1-sse", "rate-json", "rate-sse"):
    ng = rows[f"nginx-{mode}"]["cpu_us_per_req"]
    ratio = lambda kind: f"{rows[f'{kind}-{mode}']['cpu_us_per_req'] / ng:.2f}×" if ng else "-"
    print(f"| {mode} | {ratio('bare')} | {ratio('proxy')} |")
print()
print(f"proxy RSS idle {int(sys.argv[2]) / 1024:.1f} MiB, peak {int(sys.argv[3]) / 1024:.1f} MiB; "
      f"audit rows written {sys.argv[4]}; spans received by the OTLP sink {sys.argv[5]}")
EOF
