# agentd: built with cargo on Debian bookworm, run on distroless (glibc, CA certificates,
# tzdata and a non-root user; no shell, no package manager).
#
# The image has no PostgreSQL: always set DATABASE_URL (without it agentd would try to start
# an embedded server). Examples: compose.yaml, deploy/kubernetes/, deploy/README.md.
#
#   docker build -t agentd .
#   docker run --rm -e DATABASE_URL=postgres://… agentd migrate
#   docker run -d -e DATABASE_URL=postgres://… -p 9464:9464 \
#     -v agentd-artifacts:/home/nonroot/artifacts agentd
#
# With artifacts in S3 instead of a folder: docker build --build-arg FEATURES=s3 …

FROM rust:1-slim-bookworm AS build
# Cargo features to build with, e.g. "s3" (empty: the default build).
ARG FEATURES=""
WORKDIR /src
# Dependencies first, in a layer of their own, so that changing our code does not rebuild
# them: build once with empty sources, then with the real ones. Every target Cargo.toml
# declares must exist for cargo to read the manifest, hence the empty bench.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/next_after.rs \
 && cargo build --release --locked --bin agentd ${FEATURES:+--features "$FEATURES"} \
 && rm -rf src
# Compiled into the binary: the migrations (sqlx::migrate!) and config/default.toml.
COPY migrations migrations
COPY config config
COPY src src
# touch: the copied sources may be older than the empty build, which cargo would keep.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin agentd ${FEATURES:+--features "$FEATURES"} \
 && mkdir -p /out/artifacts

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/agentd /usr/local/bin/agentd
# The artifacts folder, owned by nonroot (uid 65532) so that a named volume mounted there
# starts out writable. Mount a volume (or a folder shared by all replicas) here, or keep
# artifacts in S3 (artifacts.url, the `s3` feature) instead.
COPY --from=build --chown=65532:65532 /out/artifacts /home/nonroot/artifacts
USER nonroot
WORKDIR /home/nonroot
# The HTTP endpoints (/healthz, /readyz, /metrics) on every interface of the container,
# JSON logs, artifacts in the folder above. Any setting can be overridden the same way
# (AGENTD__SECTION__KEY); these variables win over a file given with AGENTD_CONFIG.
ENV AGENTD__HTTP__LISTEN=0.0.0.0:9464 \
    AGENTD__LOGGING__FORMAT=json \
    AGENTD__ARTIFACTS__DIR=/home/nonroot/artifacts
EXPOSE 9464
# Liveness only (GET /healthz, no curl needed). Readiness (database reachable, migrations
# current) is GET /readyz, for orchestrators that ask.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/agentd", "healthcheck"]
# SIGTERM drains: running runs get shutdown.grace (30s by default) to finish, so give the
# container more than that before it is killed (docker stop -t 45, stop_grace_period: 45s,
# terminationGracePeriodSeconds: 45).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/agentd"]
# `agentd migrate` for a one-shot migration; `run --migrate` migrates at start-up.
CMD ["run"]
