# Shared by bench/load.sh and bench/instr.sh (sourced, not run).

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# wait_port PORT: until something listens on 127.0.0.1:PORT (60 s; valgrind starts slowly).
wait_port() { for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up" >&2; exit 2; }

# nginx_conf FILE DIR LISTEN_PORT UPSTREAM_PORT PROCESS_LINE: nginx as a plain reverse proxy
# (keep-alive upstream, no buffering), the reference for the proxy under test.
nginx_conf() {
  cat >"$1" <<NGX
$5
daemon off;
pid $2/nginx.pid;
error_log $2/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream up { server 127.0.0.1:$4; keepalive 1024; }
  server {
    listen 127.0.0.1:$3;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
}
NGX
}
