# agentd: build with cargo, run on slim Debian as a non-root user.
# The image has no PostgreSQL: set DATABASE_URL.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in a layer of their own, so that changing our code does not rebuild
# them: build once with empty sources, then with the real ones.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src migrations benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > benches/next_after.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin agentd \
 && rm -rf src
COPY migrations migrations
COPY config config
COPY benches benches
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin agentd

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/agentd --create-home agentd
COPY --from=build /src/target/release/agentd /usr/local/bin/agentd
USER agentd
WORKDIR /var/lib/agentd
STOPSIGNAL SIGTERM
# `agentd run`; for a one-shot migration use `--entrypoint agentd <image> migrate`, or run
# with `--migrate` / AGENTD__DATABASE__MIGRATE=true.
ENTRYPOINT ["agentd", "run"]
