# The Haven image: the one binary (node, CLI, the example apps) on a small Debian.
#   docker build -t haven:0.1.0 .
# Build stage: the same release build as `cargo build --release --locked` anywhere else
# (Rust 1.95, no C libraries beyond a C compiler for ring and zstd).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p haven \
 && install -m 0755 target/release/haven /usr/local/bin/haven

# Run stage: sh and sed for the StatefulSet's start command, CA certificates for an
# https:// object store, and an unprivileged user matching the manifests' runAsUser.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 haven \
 && useradd --system --uid 10001 --gid haven --home-dir /var/lib/haven --shell /usr/sbin/nologin haven \
 && install -d -o haven -g haven -m 0750 /var/lib/haven
COPY --from=build /usr/local/bin/haven /usr/local/bin/haven
USER 10001:10001
WORKDIR /var/lib/haven
EXPOSE 8001 9001 7001
ENTRYPOINT ["haven"]
CMD ["--help"]
