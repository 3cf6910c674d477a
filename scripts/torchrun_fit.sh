#!/bin/bash
# Multi-node DDP launch with torchrun (no SLURM): run this on every node with its NODE_RANK.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 ./scripts/torchrun_fit.sh configs/fasterrcnn_ddp_multinode.yaml
#
# Lightning detects torchrun's environment (LOCAL_RANK, RANK, WORLD_SIZE) and does not
# spawn processes itself. trainer.num_nodes / trainer.devices in the config must match.
set -euo pipefail
CONFIG=${1:-configs/fasterrcnn_ddp_multinode.yaml}
NPROC=${NPROC_PER_NODE:-4}
exec .venv/bin/torchrun \
  --nnodes="${NNODES:-2}" --node_rank="${NODE_RANK:?set NODE_RANK}" --nproc_per_node="$NPROC" \
  --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}" \
  -m detlens.cli fit --config "$CONFIG"
