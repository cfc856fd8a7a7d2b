#!/usr/bin/env bash
# Train on the GPUs of this machine with the `deepspeed` launcher (one process per GPU; CPU processes
# with gloo when there is no GPU). Options after the launcher's own go to jobs/train.py.
set -euo pipefail

usage() {
  cat <<'TEXT'
usage: jobs/launch/single_node.sh [--gpus N] [--master-port PORT] [TRAIN OPTIONS...]

  --gpus N            processes to start (default: every visible GPU, or 2 CPU processes without one)
  --master-port PORT  rendezvous port (default: $MASTER_PORT or 29500)
  TRAIN OPTIONS       passed to jobs/train.py, e.g.
                        --recipe S --data /data/latents --output-dir runs/S --resume auto --set optim.lr=2e-4

example:
  jobs/launch/single_node.sh --gpus 8 --recipe S --data /data/latents --output-dir runs/S --resume auto
TEXT
}

gpus=""
port="${MASTER_PORT:-29500}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --master-port) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

cd "$(dirname "$0")/../.."
python="${PYTHON:-python}"
deepspeed="${DEEPSPEED:-deepspeed}"
visible=$("$python" -c "import torch; print(torch.cuda.device_count())")
if [[ "$visible" == "0" ]]; then
  export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator and gloo
  gpus="${gpus:-2}"
else
  gpus="${gpus:-$visible}"
fi
exec "$deepspeed" --num_gpus "$gpus" --master_port "$port" jobs/train.py "$@"
