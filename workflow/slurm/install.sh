#!/usr/bin/env bash
# Install a local single-node SLURM (Debian 12 packages) for tests.
# Idempotent: when everything is already installed it only checks and exits.
#   slurm-wlm (slurmctld, slurmd, slurm-client), slurmdbd, munge, mariadb-server
set -euo pipefail

PKGS=(slurm-wlm slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "[slurm-install] already installed: ${PKGS[*]}"
else
  echo "[slurm-install] installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # Wait for a concurrent apt/dpkg (other jobs on the machine) instead of failing.
  APT_OPTS=(-o DPkg::Lock::Timeout=900 -y -q --no-install-recommends)
  # Do not let package postinst scripts try to start services (no systemd in a container).
  POLICY=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    created_policy=1
  fi
  trap 'if [ "$created_policy" = 1 ]; then $SUDO rm -f "$POLICY"; fi' EXIT
  # Refresh lists only when they are missing or older than a day.
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
    $SUDO apt-get -o DPkg::Lock::Timeout=900 update -q
  fi
  $SUDO apt-get install "${APT_OPTS[@]}" "${missing[@]}"
fi

for b in slurmctld slurmd slurmdbd munged mariadbd sinfo sacct sacctmgr sbatch srun; do
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || { echo "[slurm-install] ERROR: $b not found" >&2; exit 1; }
done
echo "[slurm-install] ok: slurm $(dpkg-query -W -f='${Version}' slurmctld)"
