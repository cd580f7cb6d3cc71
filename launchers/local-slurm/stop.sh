#!/usr/bin/env bash
# Stops what launchers/local-slurm/start.sh started, by the PIDs it recorded: jobs still in the queue are
# cancelled, then slurmd, slurmctld, slurmdbd, MariaDB and munged get SIGTERM (SIGKILL after a grace
# period). Safe to run when nothing (or only part) is running; it never fails for that.
set -uo pipefail

RUN_DIR=${CLSE_SLURM_RUN_DIR:-/run/clse-local-slurm}
GRACE_S=${CLSE_SLURM_STOP_GRACE_S:-20}

say() { echo "local-slurm: $*"; }

# pid_of NAME: the recorded PID if that process is alive and still is NAME (PIDs get reused).
pid_of() {
    local pid
    pid=$(cat "$RUN_DIR/$1.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] && echo "$pid"
}

# alive PID: the process exists and is not a zombie (an exited daemon waits there until init reaps it).
alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
    [[ -n $state && $state != Z ]]
}

stop() {
    local name=$1 pid waited=0
    if ! pid=$(pid_of "$name"); then
        rm -f "$RUN_DIR/$name.pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    while alive "$pid"; do
        if ((waited >= GRACE_S * 10)); then
            say "$name ($pid) ignored SIGTERM for ${GRACE_S}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$RUN_DIR/$name.pid"
    say "stopped $name ($pid)"
}

if [[ -d $RUN_DIR ]] && pid_of slurmctld >/dev/null && command -v squeue >/dev/null; then
    # Jobs left running would outlive slurmd in their slurmstepd; this cluster is disposable.
    jobs=$(squeue -h -o %i 2>/dev/null)
    if [[ -n $jobs ]]; then
        say "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 1 100); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi

for name in slurmd slurmctld slurmdbd mariadbd munged; do
    stop "$name"
done
exit 0
