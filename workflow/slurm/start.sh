#!/usr/bin/env bash
# Start a real, local, single-node SLURM (slurmctld + slurmd + slurmdbd, munge,
# a private MariaDB) without systemd, for tests. Idempotent: daemons that already
# run are kept (restarted only when their generated config changed).
#
#   workflow/slurm/start.sh            # install if needed, start, smoke-test
#   SLURM_ELS_SKIP_SMOKE=1 start.sh    # skip the final sbatch/sacct smoke test
#
# State and logs: $SLURM_ELS_DIR (default /var/lib/slurm-els), logs in log/.
# Config: /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf (generated).
set -euo pipefail
umask 022

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TPL="$HERE/templates"
# shellcheck source=templates/els.env
. "$TPL/els.env"
ELS_T0=$(date +%s)

log() { printf '[slurm-els %3ss] %s\n' "$(( $(date +%s) - ELS_T0 ))" "$*"; }
die() { echo "[slurm-els] ERROR: $*" >&2; echo "[slurm-els] logs: $ELS_LOG" >&2; exit 1; }

# pid_alive PIDFILE NAME: the pid in PIDFILE is alive and its command is NAME
pid_alive() {
  local pid comm
  [ -s "$1" ] || return 1
  pid="$(tr -dc '0-9' 2>/dev/null < "$1")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # a zombie (not yet reaped by the container's init) counts as stopped
  grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
  [ "$comm" = "$2" ]
}

# wait_until TIMEOUT_S DESCRIPTION CMD...: poll CMD (quietly) every 0.5 s
wait_until() {
  local timeout="$1" desc="$2"; shift 2
  local end=$(( $(date +%s) + timeout ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { echo "[slurm-els] timed out after ${timeout}s: $desc" >&2; return 1; }
    sleep 0.5
  done
}

# render TEMPLATE DEST MODE: substitute @KEY@ placeholders; returns 0 if DEST changed
render() {
  local tmp; tmp="$(mktemp)"
  sed -e "s|@CLUSTER@|$SLURM_ELS_CLUSTER|g" \
      -e "s|@NODE@|$NODE|g" \
      -e "s|@TOPOLOGY@|$TOPOLOGY|g" \
      -e "s|@REAL_MEMORY@|$REAL_MEMORY|g" \
      -e "s|@DEF_MEM_PER_CPU@|$DEF_MEM_PER_CPU|g" \
      -e "s|@PARTITION@|$SLURM_ELS_PARTITION|g" \
      -e "s|@CTLD_PORT@|$SLURM_ELS_CTLD_PORT|g" \
      -e "s|@SLURMD_PORT@|$SLURM_ELS_SLURMD_PORT|g" \
      -e "s|@DBD_PORT@|$SLURM_ELS_DBD_PORT|g" \
      -e "s|@DB_PORT@|$SLURM_ELS_DB_PORT|g" \
      -e "s|@DB_USER@|$SLURM_ELS_DB_USER|g" \
      -e "s|@DB_PASS@|$SLURM_ELS_DB_PASS|g" \
      -e "s|@DB_NAME@|$SLURM_ELS_DB_NAME|g" \
      -e "s|@DB_DATA@|$ELS_DBDATA|g" \
      -e "s|@DB_SOCK@|$ELS_DBSOCK|g" \
      -e "s|@CTLD_DIR@|$ELS_CTLD|g" \
      -e "s|@SPOOL_DIR@|$ELS_SPOOL|g" \
      -e "s|@RUN_DIR@|$ELS_RUN|g" \
      -e "s|@LOG_DIR@|$ELS_LOG|g" \
      "$1" > "$tmp"
  if [ -f "$2" ] && cmp -s "$tmp" "$2"; then
    rm -f "$tmp"; chmod "$3" "$2"; return 1
  fi
  install -m "$3" "$tmp" "$2"; rm -f "$tmp"; return 0
}

[ "$(id -u)" -eq 0 ] || die "must run as root (daemons, /etc/slurm, munge)"

# ---------------------------------------------------------------- 0. packages
"$HERE/install.sh" | sed 's/^/  /'

mkdir -p "$SLURM_ELS_DIR" "$ELS_RUN" "$ELS_LOG" "$ELS_CTLD" "$ELS_SPOOL" "$SLURM_ELS_ETC"
chmod 755 "$SLURM_ELS_DIR" "$ELS_RUN" "$ELS_LOG"
# Slurm creates its log files 0600; pre-create them world-readable for debugging.
for f in slurmctld slurmd slurmdbd; do touch "$ELS_LOG/$f.log"; chmod 644 "$ELS_LOG/$f.log"; done

# ---------------------------------------------------------------- 1. config
NODE="$(hostname -s)"
# Topology exactly as slurmd detects it (else the node gets drained as invalid).
TOPOLOGY="$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')"
TOPOLOGY="${TOPOLOGY% }"
NCPU="$(slurmd -C | head -1 | tr ' ' '\n' | sed -n 's/^CPUs=//p')"
# RealMemory: a bit less than the machine has (MemTotal - 10%, at most 2 GiB off),
# from MemTotal so that it is stable across runs. Override: SLURM_ELS_REAL_MEMORY_MB.
MEM_TOTAL_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
RESERVE=$(( MEM_TOTAL_MB / 10 )); [ "$RESERVE" -le 2048 ] || RESERVE=2048
REAL_MEMORY="${SLURM_ELS_REAL_MEMORY_MB:-$(( MEM_TOTAL_MB - RESERVE ))}"
# Jobs without --mem get 1 GiB per CPU (not the whole node).
DEF_MEM_PER_CPU=$(( REAL_MEMORY / NCPU )); [ "$DEF_MEM_PER_CPU" -le 1024 ] || DEF_MEM_PER_CPU=1024

CONF_CHANGED=0
render "$TPL/slurm.conf.in" "$SLURM_ELS_ETC/slurm.conf" 644 && CONF_CHANGED=1
DBD_CHANGED=0
render "$TPL/slurmdbd.conf.in" "$SLURM_ELS_ETC/slurmdbd.conf" 600 && DBD_CHANGED=1
render "$TPL/my.cnf.in" "$ELS_MYCNF" 644 || true
log "config: node=$NODE $TOPOLOGY RealMemory=${REAL_MEMORY}MB partition=$SLURM_ELS_PARTITION cluster=$SLURM_ELS_CLUSTER (changed: slurm=$CONF_CHANGED dbd=$DBD_CHANGED)"

# ---------------------------------------------------------------- 2. munge
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  if [ ! -s /etc/munge/munge.key ]; then
    log "munge: creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key --force
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge /var/lib/munge /var/log/munge; chmod 755 /run/munge; chmod 600 /etc/munge/munge.key
  if ! pid_alive "$MUNGE_PID" munged; then
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock "$MUNGE_PID"
    log "munge: starting munged"
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 || die "munged failed (see /var/log/munge/munged.log)"
  fi
  wait_until 20 "munge credentials" munge_ok || die "munge does not work (/var/log/munge/munged.log)"
fi
log "munge: ok"

# ---------------------------------------------------------------- 3. mariadb
db() { mariadb --defaults-file="$ELS_MYCNF" --protocol=socket -uroot; }
if ! pid_alive "$ELS_RUN/mariadbd.pid" mariadbd; then
  chown mysql:mysql "$ELS_RUN"  # socket + pid file
  if [ ! -d "$ELS_DBDATA/mysql" ]; then
    log "mariadb: initialising $ELS_DBDATA"
    mkdir -p "$ELS_DBDATA"; chown mysql:mysql "$ELS_DBDATA"
    mariadb-install-db --defaults-file="$ELS_MYCNF" --user=mysql --skip-test-db \
      --auth-root-authentication-method=socket > "$ELS_LOG/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed ($ELS_LOG/mariadb-install.log)"
  fi
  log "mariadb: starting (127.0.0.1:$SLURM_ELS_DB_PORT, socket $ELS_DBSOCK)"
  rm -f "$ELS_DBSOCK"
  setsid /usr/sbin/mariadbd --defaults-file="$ELS_MYCNF" </dev/null >>"$ELS_LOG/mariadb.log" 2>&1 &
fi
wait_until 60 "mariadb" mariadb-admin --defaults-file="$ELS_MYCNF" --protocol=socket -uroot ping \
  || die "mariadb did not come up ($ELS_LOG/mariadb.log)"
db <<SQL || die "could not create database/user"
CREATE DATABASE IF NOT EXISTS \`$SLURM_ELS_DB_NAME\`;
CREATE USER IF NOT EXISTS '$SLURM_ELS_DB_USER'@'127.0.0.1' IDENTIFIED BY '$SLURM_ELS_DB_PASS';
CREATE USER IF NOT EXISTS '$SLURM_ELS_DB_USER'@'localhost' IDENTIFIED BY '$SLURM_ELS_DB_PASS';
ALTER USER '$SLURM_ELS_DB_USER'@'127.0.0.1' IDENTIFIED BY '$SLURM_ELS_DB_PASS';
ALTER USER '$SLURM_ELS_DB_USER'@'localhost' IDENTIFIED BY '$SLURM_ELS_DB_PASS';
GRANT ALL ON \`$SLURM_ELS_DB_NAME\`.* TO '$SLURM_ELS_DB_USER'@'127.0.0.1';
GRANT ALL ON \`$SLURM_ELS_DB_NAME\`.* TO '$SLURM_ELS_DB_USER'@'localhost';
SQL
log "mariadb: ok (database $SLURM_ELS_DB_NAME)"

# ---------------------------------------------------------------- 4. slurmdbd
stop_daemon() {  # stop_daemon PIDFILE NAME
  local pid
  pid_alive "$1" "$2" || return 0
  pid="$(tr -dc '0-9' 2>/dev/null < "$1")"
  kill -TERM "$pid" 2>/dev/null || true
  log "$2: restarting (config changed)"
  wait_until 30 "$2 to exit" pid_gone "$1" "$2" || kill -KILL "$pid" 2>/dev/null || true
}
pid_gone() { ! pid_alive "$1" "$2"; }
if [ "$DBD_CHANGED" = 1 ]; then stop_daemon "$ELS_RUN/slurmdbd.pid" slurmdbd; fi
if ! pid_alive "$ELS_RUN/slurmdbd.pid" slurmdbd; then
  log "slurmdbd: starting"
  /usr/sbin/slurmdbd </dev/null >>"$ELS_LOG/slurmdbd.out" 2>&1 || die "slurmdbd failed ($ELS_LOG/slurmdbd.log)"
fi
wait_until 60 "slurmdbd (sacctmgr list cluster)" timeout 10 sacctmgr -n list cluster \
  || die "slurmdbd does not answer ($ELS_LOG/slurmdbd.log)"
log "slurmdbd: ok"

# Cluster must exist in the database before slurmctld registers with it.
if [ -z "$(sacctmgr -n -P list cluster "$SLURM_ELS_CLUSTER" format=cluster 2>/dev/null)" ]; then
  log "sacctmgr: add cluster $SLURM_ELS_CLUSTER"
  sacctmgr -i add cluster "$SLURM_ELS_CLUSTER" >/dev/null
fi

# ---------------------------------------------------------------- 5. slurmctld
if [ "$CONF_CHANGED" = 1 ]; then stop_daemon "$ELS_RUN/slurmd.pid" slurmd; stop_daemon "$ELS_RUN/slurmctld.pid" slurmctld; fi
if ! pid_alive "$ELS_RUN/slurmctld.pid" slurmctld; then
  log "slurmctld: starting"
  /usr/sbin/slurmctld </dev/null >>"$ELS_LOG/slurmctld.out" 2>&1 || die "slurmctld failed ($ELS_LOG/slurmctld.log)"
fi
wait_until 60 "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q UP' \
  || die "slurmctld does not answer ($ELS_LOG/slurmctld.log)"
log "slurmctld: ok"

# ---------------------------------------------------------------- 6. slurmd
if ! pid_alive "$ELS_RUN/slurmd.pid" slurmd; then
  log "slurmd: starting (node $NODE)"
  /usr/sbin/slurmd -N "$NODE" </dev/null >>"$ELS_LOG/slurmd.out" 2>&1 || die "slurmd failed ($ELS_LOG/slurmd.log)"
fi
node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }
node_ready() { case "$(node_state)" in idle|mixed|allocated|completing) return 0;; *) return 1;; esac; }
if ! wait_until 30 "node $NODE idle" node_ready; then
  # e.g. drained/down from an earlier unclean stop: resume it once.
  log "node $NODE is '$(node_state)'; resuming"
  scontrol update nodename="$NODE" state=resume 2>/dev/null || true
  wait_until 30 "node $NODE idle" node_ready \
    || die "node $NODE is '$(node_state)': $(scontrol show node "$NODE" | grep -i reason || true) ($ELS_LOG/slurmd.log)"
fi
log "slurmd: ok (node $NODE $(node_state))"

# ---------------------------------------------------------------- 7. accounts
ME="$(id -un)"
if [ -z "$(sacctmgr -n -P list account "$SLURM_ELS_ACCOUNT" format=account 2>/dev/null)" ]; then
  log "sacctmgr: add account $SLURM_ELS_ACCOUNT"
  sacctmgr -i add account "$SLURM_ELS_ACCOUNT" cluster="$SLURM_ELS_CLUSTER" \
    description="local test account" organization=els >/dev/null
fi
if ! sacctmgr -n -P list assoc cluster="$SLURM_ELS_CLUSTER" account="$SLURM_ELS_ACCOUNT" user="$ME" format=user \
     2>/dev/null | grep -qx "$ME"; then
  log "sacctmgr: add user $ME to account $SLURM_ELS_ACCOUNT"
  sacctmgr -i add user "$ME" account="$SLURM_ELS_ACCOUNT" cluster="$SLURM_ELS_CLUSTER" \
    defaultaccount="$SLURM_ELS_ACCOUNT" >/dev/null
fi
log "accounts: user $ME in account $SLURM_ELS_ACCOUNT ($(sacctmgr -n -s list user "$ME" format=account%30 | xargs))"

# ---------------------------------------------------------------- 8. smoke test
if [ "${SLURM_ELS_SKIP_SMOKE:-0}" != 1 ]; then
  # Submit like the Snakemake plugin does (sbatch) and poll sacct, as it does;
  # faster than `sbatch --wait`, whose polling interval grows to 10 s.
  JOBID="$(sbatch --parsable -A "$SLURM_ELS_ACCOUNT" -p "$SLURM_ELS_PARTITION" \
           -J els-smoke -t 1 --mem=50 -c 1 -o "$ELS_LOG/smoke-%j.out" --wrap 'hostname')" \
    || die "smoke job submission failed (sbatch)"
  JOBID="${JOBID%%;*}"
  sacct_state() { sacct -n -X -P -j "$JOBID" -o State 2>/dev/null | head -1; }
  sacct_final() { case "$(sacct_state)" in ""|PENDING|RUNNING|COMPLETING|CONFIGURING) return 1;; *) return 0;; esac; }
  wait_until 60 "job $JOBID to finish (sacct)" sacct_final || die "smoke job $JOBID: sacct state '$(sacct_state)'"
  [ "$(sacct_state)" = COMPLETED ] || die "smoke job $JOBID: sacct state '$(sacct_state)'"
  log "smoke: job $JOBID ran on '$(head -1 "$ELS_LOG/smoke-$JOBID.out" 2>/dev/null)', sacct: $(sacct_state)"
  rm -f "$ELS_LOG/smoke-$JOBID.out"
fi

log "SLURM is up in $(( $(date +%s) - ELS_T0 ))s: cluster=$SLURM_ELS_CLUSTER partition=$SLURM_ELS_PARTITION account=$SLURM_ELS_ACCOUNT logs=$ELS_LOG"
