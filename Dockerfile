# session-sidecar: build with the Rust toolchain, run on a small non-root Debian image.
#   docker build -t session-sidecar .
#   docker run -p 8080:8080 -v sessions:/data -e SESSION_SIDECAR_UPSTREAM=http://app:8000 session-sidecar
# Only /data is written: the container runs with a read-only root (`docker run --read-only`).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The dependencies in a layer of their own: a change under src/ rebuilds only the sidecar.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && cargo build --release --locked --bin session-sidecar \
 && rm -rf src
COPY src ./src
# COPY keeps the files' own times, which can be older than the placeholder build's.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin session-sidecar \
 && strip target/release/session-sidecar

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar \
 && mkdir -p /data /etc/session-sidecar \
 && chown sidecar:sidecar /data
COPY --from=build /src/target/release/session-sidecar /usr/local/bin/session-sidecar
COPY config/sidecar.toml /etc/session-sidecar/sidecar.toml
# Container defaults; every key of the file can be overridden the same way (docs/CONFIGURATION.md).
# The admin listener stays on the container's loopback, where the health check reaches it; to
# scrape /metrics from outside, set SESSION_SIDECAR_ADMIN__LISTEN=0.0.0.0:9091 together with
# SESSION_SIDECAR_ADMIN__TOKEN_FILE (a secret): a non-loopback admin listener without a token is
# refused at start.
ENV SESSION_SIDECAR_LISTEN=0.0.0.0:8080 \
    SESSION_SIDECAR_STORE__PATH=/data/sessions \
    RUST_LOG=info
VOLUME ["/data"]
EXPOSE 8080
USER sidecar
STOPSIGNAL SIGTERM
# Ready = the admin listener's /readyz: not draining, and the store takes a durable write.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/session-sidecar", "healthcheck", "--config", "/etc/session-sidecar/sidecar.toml"]
# The binary is PID 1 and handles SIGTERM itself: it drains, flushes the store and exits 0.
ENTRYPOINT ["/usr/local/bin/session-sidecar"]
CMD ["--config", "/etc/session-sidecar/sidecar.toml"]
