"""Run under `deepspeed --num_gpus 2`: what gradient does DeepSpeed apply for each ZeRO stage?

Every rank computes a different loss on the same model (as the SP ranks of one group do: each holds a
share of the sample's loss). With SGD at lr=1 and no clipping the update IS the gradient DeepSpeed
reduced, whatever the stage (ZeRO-1 reduces at the step, ZeRO-2/3 in backward hooks, ZeRO-3 by
reduce-scatter). Rank 0 prints one JSON line: per stage and loss factor, the applied update and the
local gradients of every rank, for the test to compare.
"""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> int:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from pipeline.train.distributed import skip_cpu_shm_op

    skip_cpu_shm_op()  # not needed for training; its JIT build is slow (see the function)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.arange(4, dtype=torch.float32).reshape(1, 4) * (rank + 1) + rank  # a different input per rank
    report = {"world_size": world, "runs": []}
    for stage in (1, 2, 3):
        for factor in (1.0, float(world)):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
            # The rank's local gradient, from an untouched copy of the same initial weights.
            reference = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
            h = torch.tanh(x @ reference[0].T + reference[1]) @ reference[2].T + reference[3]
            local = torch.autograd.grad(h.square().sum(), reference)
            gathered = []
            for g in local:
                parts = [torch.empty_like(g) for _ in range(world)]
                dist.all_gather(parts, g.contiguous())
                gathered.append([p.tolist() for p in parts])
            before = [p.detach().clone() for p in model.parameters()]
            config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                      "gradient_clipping": 0.0, "steps_per_print": 10**9}
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            loss = engine(x).square().sum()
            engine.backward(loss * factor)
            engine.step()
            after = [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()]
            update = [(b - a).tolist() for b, a in zip(before, after)]
            report["runs"].append({"stage": stage, "factor": factor, "update": update, "local_grads": gathered})
            del engine, optimizer
    if rank == 0:
        print("PROBE " + json.dumps(report), flush=True)
    dist.barrier()
    # Tear the group down before the interpreter does: c10d threads still running at exit can abort
    # the process ("terminate called without an active exception") after its work is done.
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
