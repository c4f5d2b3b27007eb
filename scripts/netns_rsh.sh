#!/usr/bin/env bash
# Open MPI's remote-shell agent for emulated nodes: `mpirun --mca plm_rsh_agent scripts/netns_rsh.sh`
# starts each node's daemon with `ip netns exec <host>` instead of ssh; the hostfile names the
# namespaces (scripts/netns_nodes.sh makes them). Emulated nodes share one /tmp and one host name,
# so each daemon gets a session directory of its own, or they remove each other's at exit.
host="$1"
shift
tmp="/tmp/ringtrain-ompi-$host"
mkdir -p "$tmp"
exec ip netns exec "$host" env OMPI_MCA_orte_tmpdir_base="$tmp" sh -c "$*"
