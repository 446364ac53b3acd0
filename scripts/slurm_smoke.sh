#!/bin/bash
# Smoke test of the Slurm path, run by hand as root on a Debian 12 machine (see docs/cluster.md):
# installs slurm-wlm + munge, starts a one-node cluster on localhost, submits the tiny benchmark
# (tests/fixtures: tiny-a, clip-tiny, dino-tiny, 2 subjects × {ti, hifi}) as a 2-task array
# with scripts/benchmark_array.sbatch (minus its GPU request), waits, then runs `report`.
#
#   sudo BIN=target/release/hifi-tuner bash scripts/slurm_smoke.sh
#
# It leaves the daemons running only if KEEP=1; otherwise it stops the ones it started.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(readlink -f "${BIN:-$ROOT/target/release/hifi-tuner}")
WORK=${WORK:-/tmp/hifi-slurm-smoke}
[ "$(id -u)" = 0 ] || { echo "run as root (it installs packages and starts daemons)"; exit 1; }
[ -x "$BIN" ] || { echo "no binary at $BIN (make build, or BIN=...)"; exit 1; }

echo "== install"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
dpkg-query -W slurm-wlm munge

echo "== munge"
mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
STARTED=()
cleanup() {
    if [ "${KEEP:-0}" != 1 ]; then
        for d in "${STARTED[@]}"; do
            pid=$(cat "/run/$d.pid" 2>/dev/null || pgrep -x "$d" || true)
            [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
        done
    fi
}
trap cleanup EXIT
if ! pgrep -x munged >/dev/null; then runuser -u munge -- munged --force; STARTED+=(munged); fi
sleep 1
munge -n | unmunge | grep STATUS

echo "== slurm (one node: $(hostname -s), $(nproc) CPUs)"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=smoke
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
if ! pgrep -x slurmctld >/dev/null; then slurmctld; STARTED+=(slurmctld); fi
if ! pgrep -x slurmd >/dev/null; then slurmd; STARTED+=(slurmd); fi
for _ in $(seq 30); do sinfo -h -o %T | grep -qE 'idle|mixed' && break; sleep 1; done
sinfo

echo "== tiny dataset in $WORK"
rm -rf "$WORK"; mkdir -p "$WORK/logs"
for s in dog teapot; do
    mkdir -p "$WORK/dataset/$s" "$WORK/masks/$s"
    cp "$ROOT"/tests/fixtures/photos/dog/* "$WORK/dataset/$s/"
    cp "$ROOT"/tests/fixtures/photos/dog-masks/* "$WORK/masks/$s/"
done
cat > "$WORK/dataset/prompts_and_classes.txt" <<'TXT'
subject_name,class
dog,dog
teapot,teapot

Object Prompts
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token),

Live Subject Prompts
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
TXT
sed '/--gres/d' "$ROOT/scripts/benchmark_array.sbatch" > "$WORK/array.sbatch"

echo "== sbatch --array=0-1"
cd "$WORK"
export BIN MODEL="$ROOT/tests/fixtures/tiny-a" DATASET="$WORK/dataset" MASKS="$WORK/masks" \
    CLIP="$ROOT/tests/fixtures/clip-tiny" DINO="$ROOT/tests/fixtures/dino-tiny" RUN="$WORK/run" \
    EXTRA="--methods ti,hifi --prompts 2 --images-per-prompt 1 --learn-steps 3 --stepwise-steps 1 --steps 6 --t-start 5 --t-end 2 --guidance-steps 2 --device cpu"
JOB=$(sbatch --parsable --array=0-1 --cpus-per-task=1 --mem=0 --export=ALL "$WORK/array.sbatch")
echo "job $JOB"
for _ in $(seq 600); do
    [ -z "$(squeue -h -j "$JOB" 2>/dev/null)" ] && break
    sleep 2
done
squeue -j "$JOB" || true
for f in "$WORK"/logs/*.out; do echo "--- $f"; tail -n 3 "$f"; done

echo "== report"
"$BIN" report "$WORK/run"
ls -la "$WORK/run"
