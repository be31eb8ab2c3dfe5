"""Several processes, one job, under torchrun: training's ranks (mmser.runner) and the extraction steps' alike.

  setup_distributed(device)      (rank, world size, device) from torchrun's environment, the process
                                 group started; (0, 1, device) without torchrun, nothing imported
  end_distributed()              the process group closed, where one was started
  rank_and_world()               this process's (rank, world size) in the started group, else (0, 1)
  gather_from_ranks(value, n)    [every rank's value] in rank order: the one way results cross ranks
  wait_for_ranks()               every rank has come this far (a barrier)
  share(items, weigh)            this rank's share of a list of work, balanced by weigh(item) (audio
                                 seconds, say) so that the ranks finish together; the one place an
                                 extraction step's work is divided (extraction.pending)
Nothing here imports torch without torchrun: a script's --help and a one-process run stay as they were.
"""
import heapq
import os
import sys

from mmser.settings import RunError


def setup_distributed(device, timeout=None):
    """(rank, world size, device) from torchrun's environment; one process without it. On CUDA each
    process takes the GPU of its LOCAL_RANK, cuda:LOCAL_RANK. timeout: how long a collective waits for
    the slowest rank (a datetime.timedelta; None: torch's default, minutes)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    import torch
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda")
    if cuda and local_rank >= torch.cuda.device_count():
        raise RunError(f"process {local_rank} of this node needs a GPU of its own, but torch sees "
                       f"{torch.cuda.device_count()}; start at most that many per node (--nproc_per_node)")
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)  # before NCCL starts, so its communicator uses this GPU
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(cuda), timeout=timeout)
    return rank, world, device


def process_group_backend(cuda):
    """NCCL only carries CUDA tensors: the few CPU-side collectives (the loss check, the epoch's
    loss, gathered predictions and speech vectors, the extraction steps' reports) go through gloo beside it."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def end_distributed():
    """Close the process group setup_distributed started (none without torchrun)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world():
    """(rank, world size) of this process in the process group setup_distributed started; (0, 1)
    without one. Asked where the work is divided, so that nothing between a script and its steps
    carries the rank."""
    dist = sys.modules.get("torch.distributed")  # imported by setup_distributed where there is a group
    if dist is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_from_ranks(value, world_size):
    """[every rank's value] in rank order under torchrun (a collective: every rank calls it), or
    [value] in one process. The one way results cross ranks: predictions, speech vectors, RNG states,
    the extraction steps' reports."""
    if world_size == 1:
        return [value]
    import torch.distributed as dist
    values = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def wait_for_ranks():
    """Return when every rank has called it (through gloo, beside NCCL too); at once in one process."""
    gather_from_ranks(None, rank_and_world()[1])


def share(items, weigh=None):
    """This rank's share of `items` (each rank computes the same division from the same list), in
    their order: the heaviest first to the rank with the least so far (ties to the lower rank), so
    that the shares' weights, weigh(item) (default 1: every other item), come out nearly equal and
    the ranks finish together. All of `items` in one process."""
    rank, world = rank_and_world()
    if world == 1:
        return list(items)
    weights = [weigh(item) for item in items] if weigh else [1.0] * len(items)
    loads = [(0.0, r) for r in range(world)]  # a heap of (weight so far, rank)
    mine = []
    for i in sorted(range(len(items)), key=lambda i: -weights[i]):  # stable: equal weights in list order
        load, r = heapq.heappop(loads)
        heapq.heappush(loads, (load + weights[i], r))
        if r == rank:
            mine.append(i)
    return [items[i] for i in sorted(mine)]
