#!/usr/bin/env bash
# Emulated nodes on one machine: N network namespaces joined by veth pairs to a bridge, so
# multi-node jobs can be tested here with traffic really crossing a (virtual) link. Needs root.
#
#   scripts/netns_nodes.sh up N          create nodes <prefix>n0 … n<N-1> (addresses 10.77.<id>.1 …)
#   scripts/netns_nodes.sh down          remove everything made by `up` with this prefix
#   scripts/netns_nodes.sh run N CMD…    up, run CMD on every node at once (NODE_RANK, NNODES,
#                                        NODE_ADDR, MASTER_ADDR set), wait, down — also on failure;
#                                        exits with the first non-zero status
#   scripts/netns_nodes.sh exec K CMD…   run CMD inside node K
#   scripts/netns_nodes.sh addr K        print node K's address
#
# RT_NETNS_ID (0-249, default 7) names everything (<prefix> = rt<ID>) and picks the subnet, so
# concurrent users don't collide. Addresses exist only inside the namespaces; the bridge has none.
# RT_LINK_RATE (e.g. 200mbit) limits what each node sends to that rate (a token-bucket qdisc on
# its eth0: tbf, since kernels without sch_netem are common in containers).
set -euo pipefail

id="${RT_NETNS_ID:-7}"
p="rt${id}"
bridge="${p}br"

addr() { echo "10.77.${id}.$(($1 + 1))"; }

up() {
    local n="$1"
    ip link add "$bridge" type bridge
    ip link set "$bridge" up
    for ((i = 0; i < n; i++)); do
        ip netns add "${p}n$i"
        ip link add "${p}v$i" type veth peer name "${p}p$i"
        ip link set "${p}v$i" master "$bridge" up
        ip link set "${p}p$i" netns "${p}n$i"
        ip netns exec "${p}n$i" ip link set "${p}p$i" name eth0
        ip netns exec "${p}n$i" ip addr add "$(addr "$i")/24" dev eth0
        ip netns exec "${p}n$i" ip link set eth0 up
        ip netns exec "${p}n$i" ip link set lo up
        if [ -n "${RT_LINK_RATE:-}" ]; then
            ip netns exec "${p}n$i" tc qdisc add dev eth0 root tbf rate "$RT_LINK_RATE" burst 256kb latency 400ms
        fi
    done
}

down() {
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^${p}n[0-9]+$" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${p}(v[0-9]+|br)$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
}

case "${1:-}" in
    up) down; up "$2" ;;
    down) down ;;
    addr) addr "$2" ;;
    exec)
        k="$2"; shift 2
        exec ip netns exec "${p}n$k" env NODE_RANK="$k" NODE_ADDR="$(addr "$k")" MASTER_ADDR="$(addr 0)" "$@"
        ;;
    run)
        n="$2"; shift 2
        trap down EXIT
        down
        up "$n"
        pids=()
        for ((i = 0; i < n; i++)); do
            ip netns exec "${p}n$i" env NODE_RANK="$i" NNODES="$n" NODE_ADDR="$(addr "$i")" MASTER_ADDR="$(addr 0)" "$@" &
            pids+=($!)
        done
        status=0
        for pid in "${pids[@]}"; do
            wait "$pid" || { s=$?; [ "$status" -ne 0 ] || status=$s; }
        done
        exit "$status"
        ;;
    *) sed -n '2,19p' "$0"; exit 2 ;;
esac
