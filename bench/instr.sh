#!/usr/bin/env bash
# Instructions per request under callgrind: repeatable on a shared VM where CPU time per request
# varies by ±20 % between identical runs. Counts every thread of the proxy (workers, store
# writer, span exporter). Two runs of the target, a short and a long one, each from start to
# exit; the difference divided by the difference in requests cancels start-up and shutdown.
# Not the benchmark of record (bench/load.sh is): a steering tool for changes worth a few
# microseconds, and a repeatable ratio to nginx.
#
#   bench/instr.sh [proxy|nospans|nginx] [CONCURRENCY] [--stream]
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-proxy} CONC=${2:-1} STREAM=${3:-}
SHORT=${SHORT:-2} LONG=${LONG:-8}
P_UP=28080 P_PROXY=28081 P_METRICS=29464 P_OTLP=24317
REL=target/release
WORK=$(mktemp -d)
source bench/common.sh

taskset -c 1 "$REL/examples/bench_upstream" 127.0.0.1:$P_UP 2>"$WORK/upstream.log" & PIDS+=($!)
taskset -c 1 "$REL/examples/otlp_sink" 127.0.0.1:$P_OTLP 2>"$WORK/otlp.log" & PIDS+=($!)
wait_port $P_UP; wait_port $P_OTLP
# One process: callgrind follows no children.
nginx_conf "$WORK/nginx.conf" "$WORK" $P_PROXY $P_UP "master_process off;"

# one SECONDS → "instructions requests" for one start-to-exit run of the target
one() {
  local out="$WORK/cg.$1" pid
  local vg=(valgrind --tool=callgrind --callgrind-out-file="$out")
  rm -f "$WORK/bench.db"*
  case $TARGET in
    proxy|nospans)
      local otlp=http://127.0.0.1:$P_OTLP; [ "$TARGET" = nospans ] && otlp=
      OTEL_EXPORTER_OTLP_ENDPOINT=$otlp RUST_LOG=warn taskset -c 0 "${vg[@]}" \
        "$REL/llm-audit" serve --listen 127.0.0.1:$P_PROXY --metrics-listen 127.0.0.1:$P_METRICS \
        --upstream http://127.0.0.1:$P_UP/v1 --db "$WORK/bench.db" 2>>"$WORK/proxy.log" & pid=$! ;;
    nginx)
      taskset -c 0 "${vg[@]}" nginx -c "$WORK/nginx.conf" -p "$WORK" 2>>"$WORK/proxy.log" & pid=$! ;;
  esac
  wait_port $P_PROXY
  local res
  res=$(taskset -c 1 "$REL/examples/loadgen" "http://127.0.0.1:$P_PROXY/v1/chat/completions" \
    --duration "$1" --concurrency "$CONC" $STREAM)
  sleep 1.5   # the span exporter's next batch (every second) belongs to these requests
  kill -TERM "$pid"; wait "$pid" || true
  local ir
  ir=$(awk '/^totals:/ {s += $2} END {print s}' "$out"*)
  echo "$ir $(sed -E 's/.*"requests":([0-9]+).*/\1/' <<<"$res")"
}
read -r IR1 N1 < <(one "$SHORT")
read -r IR2 N2 < <(one "$LONG")
[ -n "${KEEP:-}" ] && cp "$WORK"/cg."$LONG"* "$KEEP/"
awk -v a="$IR1" -v b="$IR2" -v n1="$N1" -v n2="$N2" -v t="$TARGET" -v c="$CONC" -v s="$STREAM" \
  'BEGIN { printf "%s c=%s %s requests=%d/%d instructions/request=%.0f\n", t, c, s, n1, n2, (b - a) / (n2 - n1) }'
