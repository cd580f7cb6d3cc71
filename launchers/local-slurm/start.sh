#!/usr/bin/env bash
# A single-node SLURM with accounting on this machine (Debian 12, as root, no systemd needed), for trying
# `hydra/launcher=slurm +cluster=local` and for CI. Safe to run again: what is installed, configured or
# running already is left as it is. launchers/local-slurm/stop.sh stops every daemon started here.
#
#   munged (as user munge) -> mariadbd -> slurmdbd -> slurmctld -> slurmd, one node, partition `debug`
#
# Accounting (slurmdbd) is not optional: submitit learns the state of a job from `sacct`; without it a job
# that SLURM killed or cancelled leaves the waiting sweep polling forever.
set -euo pipefail

RUN_DIR=${CLSE_SLURM_RUN_DIR:-/run/clse-local-slurm}   # PID files (read by stop.sh)
LOG_DIR=/var/log/slurm
CONF_DIR=/etc/slurm
CLUSTER=local
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS_FILE=/etc/slurm/.clse-dbd-pass                   # generated once, root-only
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

say() { echo "local-slurm: $*"; }
die() { echo "local-slurm: error: $*" >&2; exit 1; }
elapsed() { echo "$((SECONDS - ${1}))s"; }

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.5 s until it succeeds.
wait_for() {
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "$what did not come up within ${limit}s (logs: $LOG_DIR, /var/log/munge, $RUN_DIR)"
        fi
        sleep 0.5
    done
}

# running NAME: the process recorded in $RUN_DIR/NAME.pid is alive and is NAME.
running() {
    local pid
    pid=$(cat "$RUN_DIR/$1.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]
}

# record NAME PIDFILE: copy the PID a daemon wrote itself into $RUN_DIR (stop.sh reads only there).
record() {
    local pid
    pid=$(tr -dc 0-9 <"$2" 2>/dev/null) || true
    [[ -n $pid ]] || die "$1 wrote no PID to $2"
    echo "$pid" >"$RUN_DIR/$1.pid"
}

[[ $(id -u) -eq 0 ]] || die "run as root (sudo $0)"
START=$SECONDS

# --- packages ------------------------------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    t=$SECONDS
    say "installing ${missing[*]}"
    # Keep the packages' init scripts from starting daemons of their own (they would not be ours to stop).
    policy_added=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt_rc=0
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null || apt_rc=$?
    ((policy_added)) && rm -f /usr/sbin/policy-rc.d
    ((apt_rc == 0)) || die "apt-get install failed ($apt_rc)"
    say "installed in $(elapsed "$t")"
fi

install -d -m 755 "$RUN_DIR"
install -d -m 755 -o slurm -g slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /var/lib/slurm
install -d -m 755 -o munge -g munge /run/munge /var/log/munge /var/lib/munge
install -d -m 755 -o mysql -g mysql /run/mysqld /var/log/mysql

# --- munge ---------------------------------------------------------------------------------------------
install -d -m 700 -o munge -g munge /etc/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! running munged && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "using the munged that already runs here (stop.sh leaves it alone)"
elif ! running munged; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged </dev/null >>/var/log/munge/munged.out 2>&1 \
        || die "munged did not start (see /var/log/munge/munged.log)"
    wait_for 10 "munged PID file" test -s /run/munge/munged.pid
    record munged /run/munge/munged.pid
fi
wait_for 10 munged bash -c 'munge -n | unmunge'

# --- MariaDB (slurmdbd's storage) ----------------------------------------------------------------------
if [[ ! -d /var/lib/mysql/mysql ]]; then
    say "initialising the MariaDB data directory"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --auth-root-authentication-method=socket \
        >/var/log/mysql/install-db.log 2>&1 || die "mariadb-install-db failed (see /var/log/mysql/install-db.log)"
fi
if ! running mariadbd && mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1; then
    say "using the MariaDB server that already runs here (stop.sh leaves it alone)"
elif ! running mariadbd; then
    rm -f /run/mysqld/mysqld.pid
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 \
        </dev/null >>/var/log/mysql/mariadbd.out 2>&1 &
    wait_for 60 "MariaDB" mariadb-admin --socket=/run/mysqld/mysqld.sock ping
    wait_for 10 "MariaDB PID file" test -s /run/mysqld/mysqld.pid
    record mariadbd /run/mysqld/mysqld.pid
fi
if [[ ! -s $DB_PASS_FILE ]]; then
    install -d -m 755 "$CONF_DIR"
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE")
fi
DB_PASS=$(cat "$DB_PASS_FILE")
mariadb --socket=/run/mysqld/mysqld.sock -u root <<SQL
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
SQL

# --- configuration -------------------------------------------------------------------------------------
NODE=$(hostname -s)
# `slurmd -C` prints this machine as a node line: NodeName=... CPUs=... RealMemory=...
hw=$(slurmd -C | head -n 1)
[[ $hw == NodeName=* ]] || die "unexpected 'slurmd -C' output: $hw"
cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
hardware=${hw#NodeName="$NODE" }            # CPUs, sockets, cores, threads and memory as slurmd sees them
hardware=${hardware% UpTime=*}

changed=0
# put FILE MODE OWNER: write stdin to FILE if its content differs.
put() {
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if ! cmp -s "$tmp" "$1"; then
        install -m "$2" -o "$3" -g "$3" "$tmp" "$1"
        changed=1
    fi
    rm -f "$tmp"
}

install -d -m 755 "$CONF_DIR"
put "$CONF_DIR/slurm.conf" 644 root <<CONF
# Written by launchers/local-slurm/start.sh: one node ($NODE), partition debug, accounting via slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((memory / cpus))
ReturnToService=2
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=60
Waittime=0
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF

put "$CONF_DIR/slurmdbd.conf" 600 slurm <<CONF
# Written by launchers/local-slurm/start.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
CONF

if ((changed)) && { running slurmdbd || running slurmctld || running slurmd; }; then
    say "warning: the configuration changed while SLURM runs; run stop.sh then start.sh to apply it"
fi

# --- SLURM daemons -------------------------------------------------------------------------------------
# They daemonize themselves and write their PID files into $RUN_DIR (see the configs above).
if ! running slurmdbd; then
    rm -f "$RUN_DIR/slurmdbd.pid"
    slurmdbd </dev/null >>"$LOG_DIR/slurmdbd.out" 2>&1 || die "slurmdbd did not start (see $LOG_DIR/slurmdbd.log)"
fi
wait_for 60 slurmdbd sacctmgr -n list cluster
if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if [[ -z $(sacctmgr -n -P list account root format=account) ]]; then
    sacctmgr -i add account root cluster="$CLUSTER" description=root organization=local >/dev/null || true
fi
if [[ -z $(sacctmgr -n -P list user root format=user) ]]; then
    sacctmgr -i add user root account=root cluster="$CLUSTER" >/dev/null || true
fi

if ! running slurmctld; then
    rm -f "$RUN_DIR/slurmctld.pid"
    slurmctld </dev/null >>"$LOG_DIR/slurmctld.out" 2>&1 || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
fi
wait_for 60 slurmctld bash -c 'scontrol ping | grep -q UP'

if ! running slurmd; then
    rm -f "$RUN_DIR/slurmd.pid"
    slurmd </dev/null >>"$LOG_DIR/slurmd.out" 2>&1 || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
fi

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1; }
deadline=$((SECONDS + 60))
until [[ $(node_state) == idle || $(node_state) == mixed || $(node_state) == allocated ]]; do
    case $(node_state) in
        drain* | down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    ((SECONDS < deadline)) || die "node $NODE is '$(node_state)', not idle, after 60s (see $LOG_DIR/slurmd.log)"
    sleep 0.5
done
for name in slurmdbd slurmctld slurmd; do
    running "$name" || die "$name is not running (see $LOG_DIR/$name.log)"
done
timeout 60 srun -N1 -t 1 true || die "'srun -N1 true' failed"

say "up in $(elapsed "$START"): cluster $CLUSTER, node $NODE ($cpus CPUs, ${memory} MB), partition debug; PIDs in $RUN_DIR"
