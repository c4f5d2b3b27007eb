#!/usr/bin/env bash
# A throwaway single-node Slurm cluster on this machine (Debian's slurm-wlm and munge), for tests
# that need a real srun rather than Slurm's variables faked. Needs root (slurmd starts job steps
# as their user). Everything lives in DIR; a system munge or Slurm, if any, is left alone.
#
#   scripts/slurm_local.sh start DIR   write DIR/slurm.conf, start munged, slurmctld and slurmd,
#                                      wait until the node is idle, then print the line to run:
#                                      export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm_local.sh stop DIR    cancel the jobs, stop the daemons `start` started (their pid
#                                      files), and any job step processes they left
#
# Both are idempotent: `start` on a running cluster only prints the line again; `stop` on a
# stopped one does nothing. `start` stops what it started if the cluster does not come up, and
# exits 3 (not 1) when it cannot run here at all: a daemon not installed, or not root.
# SLURM_LOCAL_TIMEOUT (seconds, default 60) bounds each wait.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
[ $# -eq 2 ] && [[ "$1" =~ ^(start|stop)$ ]] || usage
cmd="$1"
# Nothing to stop in a directory that is not there (and no reason to make it).
[ "$cmd" != stop ] || [ -d "$2" ] || exit 0
mkdir -p "$2"
dir="$(cd "$2" && pwd)"
timeout_s="${SLURM_LOCAL_TIMEOUT:-60}"
conf="$dir/slurm.conf"
# Node and controller are this machine under the short name slurmd looks itself up by.
host="$(hostname -s)"

say() { echo "slurm_local: $*" >&2; }

# Whether process PID runs: a zombie (ended, not yet reaped by a lax init) does not.
alive() {
    local s
    read -r s 2>/dev/null <"/proc/$1/stat" || return 1
    s="${s##*) }" # after the command name, which may hold spaces: "state ppid ..."
    [ "${s%% *}" != Z ]
}

# pid of DIR's daemon NAME if it is running, else nothing.
live_pid() {
    local f="$dir/run/$1.pid" pid
    [ -s "$f" ] || return 0
    pid="$(cat "$f")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid"; then echo "$pid"; fi
}

# A TCP port nobody listens on, in 10000-19999: below ringtrain's Slurm store ports (20000-39999),
# so the test jobs cannot collide with the daemons, and below the kernel's ephemeral range (from
# 32768 by default), where a port nobody listens on may still be some connection's local end and
# fail the daemon's bind.
free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((10000 + RANDOM % 10000))
        # Refused means free; bash's /dev/tcp needs no extra tool.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    say "no free TCP port found in 10000-19999"
    return 1
}

# Last lines of a log, for the error that names a daemon which did not come up.
tail_log() {
    if [ -s "$1" ]; then
        echo "--- last lines of $1 ---" >&2
        tail -n 25 "$1" >&2
    else
        echo "--- $1 is empty or missing ---" >&2
    fi
}

# Starts daemon NAME (it forks itself away); names it, with its log, if it exits with an error.
launch() {
    local name="$1" log="$2"
    shift 2
    if ! "$@" 2>>"$log"; then
        say "$name failed to start"
        tail_log "$log"
        return 1
    fi
}

# Waits until `check` succeeds, for at most $timeout_s; on failure names DAEMON and shows LOG.
wait_for() {
    local daemon="$1" log="$2" check="$3" deadline=$((SECONDS + timeout_s))
    until eval "$check" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "$daemon did not come up within ${timeout_s}s"
            tail_log "$log"
            return 1
        fi
        sleep 0.5
    done
}

write_config() {
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/munge"
    # The key must be private to its owner, or munged refuses it.
    chmod 0700 "$dir/munge"
    if [ ! -s "$dir/munge/munge.key" ]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$dir/munge/munge.key" --force
        else
            dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 0600 "$dir/munge/munge.key"
    local ctld_port slurmd_port cpus
    ctld_port="$(free_port)"
    slurmd_port="$(free_port)"
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port="$(free_port)"; done
    # At least 8 CPUs whatever the machine has (config_overrides below makes slurmd report the
    # configured count, not the real one): two job steps of two tasks each fit in one allocation
    # even on a 2-core runner.
    cpus="$(nproc)"
    ((cpus >= 8)) || cpus=8
    cat >"$conf" <<EOF
# Written by scripts/slurm_local.sh: a single-node test cluster; everything under $dir.
ClusterName=ringtrain-test
# Addresses, not names, for the daemons: they work where this host's name does not resolve.
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
# Our own munged, on its own socket and key, so a system munge is neither needed nor disturbed.
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Containers rarely give a usable cgroup hierarchy: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# slurmd reports the configured CPUs, not the machine's (see CPUs= below).
SlurmdParameters=config_overrides
# A node that was down (an earlier run's state) comes back by itself.
ReturnToService=2
# No mail on a test node (the default program is not installed).
MailProg=/bin/true
# Short timeouts: a test waits for these.
SlurmdTimeout=30
KillWait=5
InactiveLimit=0
MinJobAge=30
# Job ids start somewhere random so consecutive runs' job steps get other store ports.
FirstJobId=$((1000 + RANDOM % 50000))
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    if [ -n "$(live_pid slurmctld)" ] && [ -n "$(live_pid slurmd)" ] && [ -n "$(live_pid munged)" ] &&
        SLURM_CONF="$conf" sinfo -h -N -n "$host" -o '%T' 2>/dev/null | grep -qx 'idle\|mixed\|allocated'; then
        say "already running in $dir"
        echo "export SLURM_CONF=$conf"
        return 0
    fi
    # Leftovers of a start that half worked.
    stop quiet
    for d in munged munge unmunge slurmctld slurmd sinfo scontrol scancel srun; do
        command -v "$d" >/dev/null 2>&1 || {
            say "$d not found (apt-get install slurm-wlm munge)"
            exit 3
        }
    done
    [ "$(id -u)" -eq 0 ] || {
        say "needs root (slurmd runs job steps as their user)"
        exit 3
    }
    # The daemons talk over 127.0.0.1 (NodeAddr), but jobs find their peers by the node list.
    getent hosts "$host" >/dev/null 2>&1 ||
        say "warning: this host's name $host does not resolve; jobs that look up SLURM_JOB_NODELIST will fail"
    write_config
    export SLURM_CONF="$conf"
    # On failure, stop whatever did start: nothing is left behind.
    trap 'stop quiet' ERR

    # --force: munged wants a socket directory everyone can enter, and DIR (a test's temp dir)
    # usually is private; every client here runs as root, so the warning is all it costs.
    launch munged "$dir/log/munged.log" munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    wait_for munged "$dir/log/munged.log" "munge --socket='$dir/munge/munge.socket' -n </dev/null | unmunge --socket='$dir/munge/munge.socket'"

    # -c: start from the empty state, whatever StateSaveLocation holds.
    launch slurmctld "$dir/log/slurmctld.log" slurmctld -c -f "$conf"
    wait_for slurmctld "$dir/log/slurmctld.log" "scontrol ping | grep -q UP"

    launch slurmd "$dir/log/slurmd.log" slurmd -f "$conf"
    wait_for slurmd "$dir/log/slurmd.log" "sinfo -h -N -n '$host' -o '%T' | grep -qx idle"
    trap - ERR
    say "cluster up in $dir (node $host)"
    echo "export SLURM_CONF=$conf"
}

# Sends TERM to the PIDs, waits up to 10 s for them all, then KILLs what is left. All at once:
# each daemon takes a second or two to wind down.
end_pids() {
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    for _ in $(seq 1 40); do
        local left=0 pid
        for pid in "$@"; do alive "$pid" && left=1; done
        ((left)) || return 0
        sleep 0.25
    done
    kill -KILL "$@" 2>/dev/null || true
}

# The pids of PID's descendants, from the parent pids in /proc/*/stat (procps may be absent).
descendants() {
    local -A kids=()
    local f s rest ppid p c queue=("$1") out=()
    for f in /proc/[0-9]*/stat; do
        read -r s 2>/dev/null <"$f" || continue
        rest="${s##*) }" # after the command name, which may hold spaces: "state ppid ..."
        ppid="${rest#* }"
        ppid="${ppid%% *}"
        p="${f#/proc/}"
        kids[$ppid]+=" ${p%/stat}"
    done
    while ((${#queue[@]})); do
        p="${queue[0]}"
        queue=("${queue[@]:1}")
        for c in ${kids[$p]:-}; do
            out+=("$c")
            queue+=("$c")
        done
    done
    echo "${out[@]}"
}

# This cluster's job step daemons (slurmstepd, which carry its SLURM_CONF), one pid a line.
our_steps() {
    local p comm
    for p in /proc/[0-9]*; do
        read -r comm 2>/dev/null <"$p/comm" || continue
        [ "$comm" = slurmstepd ] || continue
        if tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qxF "SLURM_CONF=$conf"; then
            alive "${p#/proc/}" && echo "${p#/proc/}"
        fi
    done
    return 0
}

stop() {
    local quiet="${1:-}" pid p pids=() steps=()
    [ -f "$conf" ] || return 0
    # Jobs first, while the controller can still end them cleanly: their step daemons end their
    # tasks and exit, and slurmd then has none to wait for.
    if [ -n "$(live_pid slurmctld)" ]; then
        SLURM_CONF="$conf" timeout 10 scancel --full --quiet --partition=debug >/dev/null 2>&1 || true
        for _ in $(seq 1 40); do
            [ -n "$(our_steps)" ] || break
            sleep 0.25
        done
    fi
    # What is left (the controller was gone, or a step would not end) is killed outright, step
    # daemons with their tasks: slurmstepd ignores TERM.
    for p in $(our_steps); do
        # shellcheck disable=SC2207 # pids: no spaces, no globs
        steps+=("$p" $(descendants "$p"))
    done
    ((${#steps[@]} == 0)) || kill -KILL "${steps[@]}" 2>/dev/null || true
    for d in slurmd slurmctld munged; do
        pid="$(live_pid "$d")"
        [ -z "$pid" ] || pids+=("$pid")
    done
    end_pids "${pids[@]}"
    rm -f "$dir/run/slurmd.pid" "$dir/run/slurmctld.pid" "$dir/run/munged.pid"
    if [ -z "$quiet" ]; then
        if ((${#pids[@]} + ${#steps[@]})); then say "stopped the cluster in $dir"; else say "nothing running in $dir"; fi
    fi
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
esac
