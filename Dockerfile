# The imgate gateway image: build with the Rust toolchain, run on slim Debian.
#   docker build -t imgate .
#   docker run -p 8080:8080 -p 7070:7070 -e IMGATE_JWT_SECRET=... imgate serve --nats nats://nats:4222
# compose.yaml builds it as imgate:latest (docker compose up --build). The container test
# (tests/e2e/compose.rs) builds the same runtime stage from tests/deploy/Containerfile.imgate
# on a local Debian base, since no registry is reachable where it runs.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The release profile keeps line tables for profiling; the image does not need them.
RUN cargo build --release --locked --bin imgate && strip target/release/imgate

FROM debian:bookworm-slim
# CA certificates: TLS to NATS (--nats-ca is only for a private CA) and to identity
# providers' keys.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home imgate
COPY --from=build /src/target/release/imgate /usr/local/bin/imgate
USER imgate
# Listen on all interfaces inside the container (a JWT secret is then required).
ENV IMGATE_HTTP=0.0.0.0:8080 \
    IMGATE_TCP=0.0.0.0:7070 \
    IMGATE_LOG_FORMAT=json
EXPOSE 8080 7070
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s CMD ["imgate", "check"]
ENTRYPOINT ["imgate"]
CMD ["serve"]
