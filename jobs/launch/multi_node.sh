#!/usr/bin/env bash
# Train across the nodes of a DeepSpeed hostfile. Run it on the first node; DeepSpeed reaches the
# others over passwordless SSH (pdsh by default) and starts jobs/train.py there from the same path,
# so every node needs this checkout and the data at the same paths. Options after the launcher's own
# go to jobs/train.py.
set -euo pipefail

usage() {
  cat <<'TEXT'
usage: jobs/launch/multi_node.sh --hostfile FILE [--nodes N] [--gpus-per-node N] [--master-addr HOST]
                                 [--master-port PORT] [--launcher pdsh|openmpi|mvapich|slurm] [TRAIN OPTIONS...]

  --hostfile FILE       "HOST slots=GPUS" per line (infra/deepspeed/hostfile.example)
  --nodes N             use the first N hosts of the hostfile (default: all)
  --gpus-per-node N     processes per node (default: the slots of each host)
  --master-addr HOST    address of rank 0 as the other nodes see it (default: the first host)
  --master-port PORT    rendezvous port (default: $MASTER_PORT or 29500)
  --launcher NAME       how DeepSpeed starts the remote processes (default: pdsh)
  TRAIN OPTIONS         passed to jobs/train.py, e.g. --recipe XL --data /data/latents --resume auto

example (2 nodes x 8 GPUs, sequence parallel over 2 GPUs):
  jobs/launch/multi_node.sh --hostfile infra/deepspeed/hostfile --recipe XL --data /data/latents \
      --output-dir /data/runs/XL --resume auto --set parallel.sp=2
TEXT
}

hostfile=""
launcher_args=()
port="${MASTER_PORT:-29500}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --nodes) launcher_args+=(--num_nodes "$2"); shift 2 ;;
    --gpus-per-node) launcher_args+=(--num_gpus "$2"); shift 2 ;;
    --master-addr) launcher_args+=(--master_addr "$2"); shift 2 ;;
    --master-port) port="$2"; shift 2 ;;
    --launcher) launcher_args+=(--launcher "$2"); shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ -z "$hostfile" ]]; then
  echo "multi_node.sh: --hostfile FILE is required (see infra/deepspeed/hostfile.example)" >&2
  usage >&2
  exit 2
fi
if [[ ! -f "$hostfile" ]]; then
  echo "multi_node.sh: hostfile $hostfile not found" >&2
  exit 2
fi
hostfile="$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")"

cd "$(dirname "$0")/../.."
python="${PYTHON:-python}"
deepspeed="${DEEPSPEED:-deepspeed}"
if [[ "$("$python" -c "import torch; print(torch.cuda.device_count())")" == "0" ]]; then
  export DS_ACCELERATOR=cpu
fi
exec "$deepspeed" --hostfile "$hostfile" "${launcher_args[@]}" --master_port "$port" jobs/train.py "$@"
