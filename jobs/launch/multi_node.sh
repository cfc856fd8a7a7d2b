#!/usr/bin/env bash
# Train across several nodes with the `deepspeed` launcher, in one of two ways:
#  - from the first node (default): DeepSpeed reaches the hosts of a hostfile over passwordless SSH
#    (pdsh by default) and starts jobs/train.py there from the same path;
#  - one launcher per node (--no-ssh), the way Kubernetes or a batch scheduler starts it: every node
#    runs this script with its own --node-rank and the same --num-nodes and --master-addr.
# Options after the launcher's own go to jobs/train.py.
set -euo pipefail

usage() {
  cat <<'TEXT'
usage: jobs/launch/multi_node.sh --hostfile FILE [--nodes N] [--gpus-per-node N] [--master-addr HOST]
                                 [--master-port PORT] [--launcher pdsh|openmpi|mvapich|slurm] [TRAIN OPTIONS...]
       jobs/launch/multi_node.sh --no-ssh --num-nodes M --node-rank N --master-addr HOST
                                 [--gpus-per-node N] [--hostfile FILE] [--master-port PORT] [TRAIN OPTIONS...]

  --hostfile FILE       "HOST slots=GPUS" per line (infra/deepspeed/hostfile.example); with --no-ssh optional
                        (default: M nodes of --gpus-per-node slots each)
  --nodes N, --num-nodes N
                        use the first N hosts of the hostfile (default: all)
  --gpus-per-node N     processes per node (default: the slots of each host; with --no-ssh and no hostfile:
                        this node's GPUs, or 1 CPU process without a GPU)
  --master-addr HOST    address of rank 0 as the other nodes see it (default: the first host; required
                        with --no-ssh)
  --master-port PORT    rendezvous port (default: $MASTER_PORT or 29500)
  --launcher NAME       how DeepSpeed starts the remote processes (default: pdsh)
  --no-ssh              start this node's processes only (DeepSpeed's --no_ssh); run once per node
  --node-rank N         this node's rank, 0..M-1 (with --no-ssh); node 0 runs global rank 0
  TRAIN OPTIONS         passed to jobs/train.py, e.g. --recipe XL --data /data/latents --resume auto

Storage: checkpoints are written by every rank. Nodes that share the output folder (a shared file
system) need nothing more. Nodes with their own disks (Kubernetes pods, cloud VMs) must set
--set train.checkpoint_mirror=s3://BUCKET/runs/NAME: every node writes its part locally and the
complete checkpoint is mirrored to object storage, where `--resume auto` finds it on a fresh node.
Latents can be read from object storage too (--data s3://BUCKET/latents).

examples:
  # from the first node, 2 nodes x 8 GPUs over SSH, sequence parallel over 2 GPUs:
  jobs/launch/multi_node.sh --hostfile infra/deepspeed/hostfile --recipe XL --data /data/latents \
      --output-dir /data/runs/XL --resume auto --set parallel.sp=2
  # one launcher per node (node 1 of 2 here; infra/k8s/train-deepspeed.yaml starts these on Kubernetes):
  jobs/launch/multi_node.sh --no-ssh --num-nodes 2 --node-rank 1 --master-addr node-0.example --gpus-per-node 8 \
      --recipe XL --data s3://BUCKET/latents --output-dir /scratch/runs/XL --resume auto \
      --set train.checkpoint_mirror=s3://BUCKET/runs/XL
TEXT
}

die() { echo "multi_node.sh: $*" >&2; exit 2; }

hostfile=""
no_ssh=0
node_rank=""
num_nodes=""
gpus_per_node=""
master_addr=""
launcher_args=()
port="${MASTER_PORT:-29500}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --nodes|--num-nodes) num_nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus_per_node="$2"; shift 2 ;;
    --master-addr) master_addr="$2"; shift 2 ;;
    --master-port) port="$2"; shift 2 ;;
    --launcher) launcher_args+=(--launcher "$2"); shift 2 ;;
    --no-ssh) no_ssh=1; shift ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

positive() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
if [[ -n "$num_nodes" ]] && ! positive "$num_nodes"; then die "--num-nodes $num_nodes must be a whole number >= 1"; fi
if [[ -n "$gpus_per_node" ]] && ! positive "$gpus_per_node"; then
  die "--gpus-per-node $gpus_per_node must be a whole number >= 1"
fi

if [[ "$no_ssh" == 1 ]]; then  # every mistake is reported before anything starts
  [[ -n "$num_nodes" ]] || die "--no-ssh needs --num-nodes M (the same on every node)"
  [[ -n "$node_rank" ]] || die "--no-ssh needs --node-rank N (0 on the node that runs rank 0)"
  if ! [[ "$node_rank" =~ ^[0-9]+$ ]] || [[ "$node_rank" -ge "$num_nodes" ]]; then
    die "--node-rank $node_rank must be a whole number from 0 to $((num_nodes - 1)) (--num-nodes $num_nodes)"
  fi
  [[ -n "$master_addr" ]] || die "--no-ssh needs --master-addr HOST: the address of node 0 as every node sees it"
elif [[ -n "$node_rank" ]]; then
  die "--node-rank is for --no-ssh (one launcher per node); from the first node DeepSpeed numbers the nodes itself"
fi
if [[ -z "$hostfile" && "$no_ssh" == 0 ]]; then
  echo "multi_node.sh: --hostfile FILE is required (see infra/deepspeed/hostfile.example)," \
    "or --no-ssh to start one launcher per node" >&2
  usage >&2
  exit 2
fi
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || die "hostfile $hostfile not found"
  hostfile="$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")"  # before the cd below
fi

cd "$(dirname "$0")/../.."
python="${PYTHON:-python}"
deepspeed="${DEEPSPEED:-deepspeed}"
visible="$("$python" -c "import torch; print(torch.cuda.device_count())")"
if [[ "$visible" == "0" ]]; then
  export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator and gloo
fi

if [[ "$no_ssh" == 1 ]]; then
  if [[ -z "$hostfile" ]]; then
    # DeepSpeed counts ranks from a hostfile even without SSH: M nodes with the same number of processes.
    # Named by its content and written atomically, so launchers on one machine share it and none deletes it.
    if [[ -n "$gpus_per_node" ]]; then slots="$gpus_per_node"
    elif [[ "$visible" == "0" ]]; then slots=1
    else slots="$visible"; fi
    hostfile="${TMPDIR:-/tmp}/pomvid-hostfile-${num_nodes}x${slots}"
    staging="$(mktemp "$hostfile.XXXXXX")"
    for ((node = 0; node < num_nodes; node++)); do echo "node-$node slots=$slots"; done > "$staging"
    mv -f "$staging" "$hostfile"
    gpus_per_node=""  # the slots say it
  fi
  launcher_args+=(--no_ssh --node_rank "$node_rank")
fi

[[ -z "$num_nodes" ]] || launcher_args+=(--num_nodes "$num_nodes")
[[ -z "$gpus_per_node" ]] || launcher_args+=(--num_gpus "$gpus_per_node")
[[ -z "$master_addr" ]] || launcher_args+=(--master_addr "$master_addr")

exec "$deepspeed" --hostfile "$hostfile" "${launcher_args[@]}" --master_port "$port" jobs/train.py "$@"
