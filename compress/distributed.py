"""Several processes, one run: ``torchrun --nproc_per_node=N -m compress run RECIPE``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`init` joins the process group (NCCL on
CUDA, one GPU per process; gloo on the CPU) and every helper here is a no-op in a single
process, so the pipeline and the training loop read the same either way.

Rules the pipeline follows (README, "Beyond one process"):
- ``batch_size`` in a recipe is the *global* batch: each of the N processes takes every N-th
  image of each global batch (a ``DistributedSampler``-equivalent split of the same seeded
  permutation), so steps per epoch, the schedule and the learning rate are those of one
  process, and a recipe's stage keys do not depend on N.
- Training stages run on every rank under ``DistributedDataParallel``; every other stage
  (prune, ensemble, export) runs on rank 0 only. Only rank 0 writes; the others wait at a
  barrier and then load what rank 0 stored, as a resumed run would.
"""

import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import CompressError

# Ranks wait at a barrier while rank 0 alone prunes, exports and measures latency (minutes);
# torchrun stops every rank when one fails, so a long timeout never hides a dead peer.
_TIMEOUT = timedelta(hours=2)


def launched():
    """True when started by torchrun (or any launcher setting WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def init(device):
    """Join the process group torchrun describes; returns the device this rank trains on
    (``cuda:LOCAL_RANK`` on CUDA). A no-op returning `device` in a single process."""
    if not launched() or active():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise CompressError(f"LOCAL_RANK {local}: only {torch.cuda.device_count()} CUDA devices; "
                                "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return device


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if active():
        dist.barrier()


def all_agree(flag):
    """True when `flag` is true on every rank (one small all-reduce)."""
    if not active():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast(obj):
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(tensors):
    """Element-wise sums over ranks of a list of same-shaped tensors (one collective)."""
    if not active() or not tensors:
        return tensors
    flat = torch.stack([t.detach().float() for t in tensors])
    dist.all_reduce(flat)
    return list(flat.unbind())


def shard():
    """(rank, world size) for slicing a global batch: this rank takes rows rank::world."""
    return rank(), world_size()


def gather_rows(fn, n, device):
    """[n, ...] on every rank, where rank r computes rows r::world with ``fn(indices)``:
    e.g. a teacher's logits over the training set, each rank on its own shard."""
    r, w = shard()
    if w == 1:
        return fn(torch.arange(n, device=device))
    idx = torch.arange(r, n, w, device=device)
    part = fn(idx)
    rows = -(-n // w)                      # ranks hold n // w or n // w + 1 rows: pad to equal
    padded = part.new_zeros((rows, *part.shape[1:]))
    padded[:len(part)] = part
    out = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(out, padded)
    full = part.new_empty((n, *part.shape[1:]))
    for k, chunk in enumerate(out):
        ids = torch.arange(k, n, w, device=device)
        full[ids] = chunk[:len(ids)]
    return full


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class _Joint(nn.Module):
    """The model and the objective as one module, so DDP averages the gradients of both
    (the objective holds trainable adapters and embeddings). Called like an objective."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, model, batch):   # `model` is self.model, passed by the loop as to any objective
        return self.objective(self.model, batch)


def wrap(model, objective, device):
    """The objective the training loop calls: `objective` itself in one process, else a
    DistributedDataParallel of model + objective (gradients averaged over ranks at each step;
    BatchNorm buffers and observers broadcast from rank 0 at each forward)."""
    if not active():
        return objective
    # channels_last conv weights whose gradients arrive in another layout (QAT's folded
    # 1-input-channel convs): DDP copies them into its buckets, which costs speed, not results.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(_Joint(model, objective), device_ids=ids)


def use_sync_batchnorm(model, enabled):
    """Swap the BatchNorm layers of `model` for SyncBatchNorm (statistics over the global
    batch, not this rank's shard) and return a function that puts the originals back.
    ``convert_sync_batchnorm`` shares the parameters and statistic tensors with the layers it
    replaces, so training updates the originals and checkpoints keep plain BatchNorm."""
    if not (enabled and active()):
        return lambda: None
    bns = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
           if isinstance(child, nn.modules.batchnorm._BatchNorm)]
    nn.SyncBatchNorm.convert_sync_batchnorm(model)   # replaces the children in place

    def restore():
        for parent, name, child in bns:
            setattr(parent, name, child)
    return restore


def check_recipe(recipe, device):
    """Refuse, before any training, what does not work with several processes."""
    if not active():
        return
    from .losses import LOSSES

    w = world_size()
    for i, s in enumerate(recipe.stages):
        bs = getattr(s, "batch_size", None)
        if bs is not None and bs % w:
            raise CompressError(f"stages[{i}].batch_size: {bs} is the global batch and must split evenly over "
                                f"{w} processes; use a multiple of {w}")
        if getattr(s, "sync_batchnorm", False) and device.type != "cuda":
            raise CompressError(f"stages[{i}].sync_batchnorm: torch's SyncBatchNorm needs CUDA (NCCL); "
                                "set it to false for CPU (gloo) runs")
        for j, t in enumerate(getattr(s, "loss", None) or []):
            why = LOSSES[t.term].distributed_problem
            if why:
                raise CompressError(f"stages[{i}].loss[{j}] ({t.term}): {why}; run this recipe in one "
                                    f"process, not {w}")
