#!/usr/bin/env bash
# Installs a real Slurm (Debian's slurm-wlm: slurmctld, slurmd, sbatch...) and munge, so that
# tests/test_slurm.py can start a one-node cluster on localhost. Idempotent; needs root (or sudo).
# The test fixture writes its own slurm.conf and munge key and starts/stops the daemons itself;
# this script only installs packages and never starts services.
# Usage: bash ci/install_slurm.bash
set -euo pipefail
if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
   && command -v munged >/dev/null; then
  echo "== slurm and munge already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "== no apt-get: cannot install slurm-wlm and munge here; tests/test_slurm.py will skip"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101 keeps package scripts from starting daemons (no systemd in containers/CI)
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod +x "$POLICY"
  CREATED_POLICY=1
fi
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurm-wlm munge
if [ "$CREATED_POLICY" = 1 ]; then $SUDO rm -f "$POLICY"; fi
echo "== installed slurm $(dpkg-query -W -f '${Version}' slurm-client), $(munged --version 2>&1 | head -1)"
