# ringtrain's image: the README's setup and build, nothing else. One stage: the binaries find
# libtorch through their RUNPATH (/opt/ringtrain/.deps/libtorch → the cache in /opt/cache), so
# the image keeps both.
#   docker build -t ringtrain .
#   docker run --rm ringtrain ringrun --nproc-per-node 2 ringtrain --config configs/fashion_mnist_cnn.yaml
FROM rust:1-bookworm
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null \
    && rm -rf /var/lib/apt/lists/*
ENV RINGTRAIN_CACHE=/opt/cache
WORKDIR /opt/ringtrain
COPY . .
RUN scripts/setup.sh && cargo build --release --bins && rm -rf target/release/build target/release/deps target/release/incremental \
    && ln -s /opt/ringtrain/target/release/ringrun /opt/ringtrain/target/release/ringtrain /usr/local/bin/
# Distributed jobs: the store port (MASTER_PORT) and, across nodes, the ring's links (any port).
EXPOSE 29500
CMD ["ringrun", "--help"]
