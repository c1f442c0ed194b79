#!/usr/bin/env bash
# A real SLURM cluster on this machine (one node, or two fake nodes on 127.0.0.1), for
# testing sbatch scripts: megarlhf's own (tests/slurm) and yours.
#
#   sudo tools/local_slurm.sh start [--nodes 1|2]   # install SLURM + munge if missing, start
#   export SLURM_CONF=/tmp/megarlhf-slurm/slurm.conf  # printed by start; clients need it
#   sbatch --gpus-per-node=0 --nodes=2 --ntasks-per-node=2 slurm/ppo_70b_rm.sh --config ...
#   tools/local_slurm.sh status
#   sudo tools/local_slurm.sh stop                    # stops only what start started
#
# Needs root: it installs Debian's packages (apt-get: slurmctld slurmd slurm-client munge)
# and runs the daemons as root (SlurmUser=root), with no systemd and no cgroups.
# Everything else lives in one folder, $MEGARLHF_SLURM_DIR (default /tmp/megarlhf-slurm):
# slurm.conf, a private munge key and socket, state, spool, logs and the PIDs of the
# daemons this script started. The fake node names are added to /etc/hosts (and removed
# again by stop) so that the first node of a job resolves as its master address.
# Ports: $MEGARLHF_SLURM_PORT (default 7817) for slurmctld, the next ones for slurmd
# (below the [10000, 30000) range job master ports are taken from).
set -euo pipefail

DIR=${MEGARLHF_SLURM_DIR:-/tmp/megarlhf-slurm}
PORT=${MEGARLHF_SLURM_PORT:-7817}
CONF=$DIR/slurm.conf
PIDS=$DIR/pids
HOSTS_MARK="# added by megarlhf tools/local_slurm.sh"
export SLURM_CONF=$CONF

usage() {
    awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
    exit 2
}

die() {
    echo "local_slurm: $*" >&2
    exit 1
}

# -- processes this script started ------------------------------------------------------
# $PIDS holds "name pid executable" lines. A PID counts as ours only while it still runs
# that executable (PIDs are reused); a zombie counts as stopped.
alive() {
    local pid=$1 exe=$2 state
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
    [[ $state != Z && $(readlink "/proc/$pid/exe" 2>/dev/null) == "$exe" ]]
}

running_daemons() {  # prints the live lines of $PIDS
    [[ -f $PIDS ]] || return 0
    local name pid exe
    while read -r name pid exe; do
        if alive "$pid" "$exe"; then echo "$name $pid $exe"; fi
    done < "$PIDS"
}

launch() {  # launch NAME EXECUTABLE CMD...: a foreground daemon in its own session, recorded
    local name=$1 exe
    exe=$(readlink -f "$(command -v "$2")")
    shift 2
    setsid "$@" > "$DIR/log/$name.out" 2>&1 < /dev/null &
    local pid=$!
    sleep 0.2
    alive "$pid" "$exe" || die "$name did not start: $(tail -n 5 "$DIR/log/$name.out")"
    echo "$name $pid $exe" >> "$PIDS"
}

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@" > /dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${secs}s waiting for $what (logs: $DIR/log)"
        sleep 0.25
    done
}

# -- start --------------------------------------------------------------------------------
install_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" > /dev/null || missing+=("$bin")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get > /dev/null ||
        die "missing ${missing[*]} and no apt-get: install SLURM (slurmctld, slurmd, client) and munge"
    echo "local_slurm: installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge; } > "$DIR/log/apt.log" 2>&1 ||
        die "apt-get failed: $(tail -n 5 "$DIR/log/apt.log")"
}

node_names() {
    local i
    for ((i = 1; i <= $1; i++)); do echo "megarlhf-node$i"; done
}

write_conf() {
    local nodes=$1 cpus mem i=0 name
    cpus=$(nproc)
    mem=$(($(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024))
    cat > "$CONF" <<EOF
# Written by megarlhf tools/local_slurm.sh: a test cluster on 127.0.0.1.
ClusterName=megarlhf-local
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (120 s
# by default): short here, so that requeue tests do not idle.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
# Small, so that \`sbatch --wait\` notices a finished job within seconds.
MinJobAge=4
KillWait=10
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
EOF
    for name in $(node_names "$nodes"); do
        i=$((i + 1))
        echo "NodeName=$name NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$cpus" \
             "RealMemory=$mem State=UNKNOWN" >> "$CONF"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
}

add_hosts() {
    local missing=() name
    for name in "$@"; do
        getent hosts "$name" > /dev/null || missing+=("$name")
    done
    ((${#missing[@]} == 0)) && return 0
    echo "127.0.0.1 ${missing[*]} $HOSTS_MARK" >> /etc/hosts
}

nodes_idle() {  # every node of the config reports idle
    local want=$1 got
    got=$(sinfo -h -N -o '%N %t' | awk '$2 == "idle"' | sort -u | wc -l)
    ((got == want))
}

start() {
    local nodes=1
    while (($#)); do
        case $1 in
            --nodes) nodes=${2:-}; shift 2 ;;
            --nodes=*) nodes=${1#*=}; shift ;;
            *) usage ;;
        esac
    done
    [[ $nodes == 1 || $nodes == 2 ]] || die "--nodes must be 1 or 2, got '$nodes'"
    [[ $(uname -s) == Linux ]] || die "needs Linux"
    ((EUID == 0)) || die "needs root (it installs packages and runs the SLURM daemons as root)"
    if [[ -n $(running_daemons) ]]; then
        local have
        have=$(grep -c '^slurmd-' <(running_daemons) || true)
        ((have == nodes)) || die "already running with $have node(s): stop it first"
        echo "local_slurm: already running ($nodes node(s))"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    mkdir -p "$DIR/log"
    install_packages
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/munge" "$PIDS"
    mkdir -p "$DIR/state" "$DIR/run" "$DIR/munge"
    for name in $(node_names "$nodes"); do mkdir -p "$DIR/spool/$name"; done
    chmod 755 "$DIR"

    # munge: a private key and socket, so that no system munged is touched or needed.
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$DIR/munge"
    chmod 755 "$DIR/munge"
    chmod 600 "$DIR/munge/munge.key"
    launch munged munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
        --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    wait_for 10 munged munge -S "$DIR/munge/munge.socket" -n

    write_conf "$nodes"
    # shellcheck disable=SC2046
    add_hosts $(node_names "$nodes")
    launch slurmctld slurmctld slurmctld -D -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    for name in $(node_names "$nodes"); do
        launch "slurmd-$name" slurmd slurmd -D -N "$name" -f "$CONF"
    done
    wait_for 60 "$nodes idle node(s)" nodes_idle "$nodes"
    sinfo
    echo "local_slurm: running ($nodes node(s)); clients need:"
    echo "export SLURM_CONF=$CONF"
}

# -- stop ---------------------------------------------------------------------------------
stop() {
    ((EUID == 0)) || die "needs root (the daemons run as root)"
    if [[ -z $(running_daemons) ]]; then
        echo "local_slurm: not running (no daemon started by this script is alive)"
        rm -f "$PIDS"
        remove_hosts
        return 0
    fi
    # Jobs first (their processes belong to this cluster), then the daemons, newest first.
    local jobs
    if jobs=$(squeue -h -o %A 2> /dev/null) && [[ -n $jobs ]]; then
        # shellcheck disable=SC2086
        scancel $jobs || true
        local end=$((SECONDS + 20))
        while [[ -n $(squeue -h -o %A 2> /dev/null) ]] && ((SECONDS < end)); do sleep 0.5; done
    fi
    local name pid exe lines
    mapfile -t lines < <(running_daemons | tac)
    for line in "${lines[@]}"; do
        read -r name pid exe <<< "$line"
        kill -TERM "$pid" 2> /dev/null || true
    done
    for line in "${lines[@]}"; do
        read -r name pid exe <<< "$line"
        local end=$((SECONDS + 15))
        while alive "$pid" "$exe" && ((SECONDS < end)); do sleep 0.2; done
        if alive "$pid" "$exe"; then
            echo "local_slurm: $name ($pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2> /dev/null || true
        fi
        echo "local_slurm: stopped $name ($pid)"
    done
    rm -f "$PIDS"
    remove_hosts
}

remove_hosts() {
    if grep -qF "$HOSTS_MARK" /etc/hosts 2> /dev/null; then
        # /etc/hosts may be a bind mount: rewrite it in place rather than replacing it.
        local kept
        kept=$(grep -vF "$HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$kept" > /etc/hosts
    fi
}

# -- status -------------------------------------------------------------------------------
status() {
    local live
    live=$(running_daemons)
    if [[ -z $live ]]; then
        echo "local_slurm: not running"
        return 1
    fi
    echo "local_slurm: running; daemons started by this script:"
    sed 's/^/  /' <<< "$live"
    sinfo || true
    echo "export SLURM_CONF=$CONF"
}

case ${1:-} in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
