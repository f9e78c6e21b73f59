# syntax=docker/dockerfile:1
# llm-audit in a container: `docker compose up` builds this (see docker-compose.yml), or
#   docker build -t llm-audit:local . && docker run --rm -p 127.0.0.1:8080:8080 llm-audit:local
# Builder and runtime are the same Debian release (bookworm), so the binary finds the glibc it
# was linked against.

# --- build ---------------------------------------------------------------------------------------
# Cargo.toml's rust-version is the minimum; this is the toolchain the project is tested with.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Only what `cargo build` reads (.dockerignore keeps target/ and the rest out of the context).
# benches/ is there because Cargo.toml declares the `recorder` bench target explicitly.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# --locked: exactly the dependency versions of Cargo.lock, or fail.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin llm-audit \
    && install -m 0755 target/release/llm-audit /usr/local/bin/llm-audit

# --- run -----------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# CA certificates for HTTPS upstreams (api.openai.com, ...). Nothing else: no shell tools beyond
# the base image's (the compose healthcheck uses bash's /dev/tcp, not curl).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# An unprivileged user owning /data, where the audit database lives (a volume: a named volume
# mounted there starts with this ownership).
RUN groupadd --system --gid 10001 llm-audit \
    && useradd --system --uid 10001 --gid llm-audit --home-dir /data --shell /usr/sbin/nologin llm-audit \
    && mkdir -p /data \
    && chown llm-audit:llm-audit /data
COPY --from=builder /usr/local/bin/llm-audit /usr/local/bin/llm-audit
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# 8080: the proxy (point SDKs' base_url at http://HOST:8080/v1); 9464: /metrics for Prometheus.
EXPOSE 8080 9464
ENTRYPOINT ["llm-audit"]
# The demo (built-in simulated upstream, generated traffic) until stopped, reachable from outside
# the container. For a real upstream: `serve --listen 0.0.0.0:8080 --metrics-listen
# 0.0.0.0:9464 --db /data/llm-audit.db --upstream https://api.openai.com/v1`.
CMD ["demo", "--duration", "0", "--listen", "0.0.0.0:8080", "--metrics-listen", "0.0.0.0:9464", "--db", "/data/llm-audit.db"]
