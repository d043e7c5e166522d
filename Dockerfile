# session-sidecar: build with the Rust toolchain, run on a small non-root Debian image.
#   docker build -t session-sidecar .
#   docker run -p 8080:8080 -v sessions:/data -e SESSION_SIDECAR_UPSTREAM=http://app:8000 session-sidecar

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin session-sidecar \
 && strip target/release/session-sidecar

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar \
 && mkdir -p /data /etc/session-sidecar \
 && chown sidecar:sidecar /data
COPY --from=build /src/target/release/session-sidecar /usr/local/bin/session-sidecar
COPY config/sidecar.toml /etc/session-sidecar/sidecar.toml
# Container defaults; every key of the file can be overridden the same way (README, "Configuration").
ENV SESSION_SIDECAR_LISTEN=0.0.0.0:8080 \
    SESSION_SIDECAR_STORE__PATH=/data/sessions \
    RUST_LOG=info
VOLUME ["/data"]
EXPOSE 8080
USER sidecar
STOPSIGNAL SIGTERM
# The binary is PID 1 and handles SIGTERM itself: it drains, flushes the store and exits.
ENTRYPOINT ["/usr/local/bin/session-sidecar"]
CMD ["--config", "/etc/session-sidecar/sidecar.toml"]
