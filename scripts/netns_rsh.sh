#!/usr/bin/env bash
# Open MPI's remote-shell agent for emulated nodes: `mpirun --mca plm_rsh_agent scripts/netns_rsh.sh`
# starts each node's daemon with `ip netns exec <host>` instead of ssh; the hostfile names the
# namespaces (scripts/netns_nodes.sh makes them).
host="$1"
shift
exec ip netns exec "$host" sh -c "$*"
