"""Module-level rank functions and a tiny training file for the training tests (spawn imports them)."""
import os
import signal
import time

TINY_TRAIN = '''
import torch
from torch import nn
from torch.utils.data import Dataset

batch_size = 8


class Noise(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 2, (64,), generator=g)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def build_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))


def train_dataset():
    return Noise()


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def eval_fn(model):
    data = Noise()
    return float((model(data.x).argmax(1) == data.y).float().mean())
'''


def ddp_settings(bucket_cap_mb):
    """Wrap a tiny model in autotiacc's DDP with a plan; report settings and averaged grads."""
    import torch
    import torch.distributed as dist

    from autotiacc.training import DDPConfig, DistributedDataParallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    cfg = DDPConfig(bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True, broadcast_buffers=False,
                    comm_hook="fp16")
    ddp = DistributedDataParallel(model, plan=cfg)
    x = torch.full((1, 4), float(rank + 1))  # rank 0 sees 1s, rank 1 sees 2s
    ddp(x).sum().backward()
    grad = model.weight.grad.tolist()
    attrs = list(vars(ddp))  # released in this order when the model is dropped
    out = {"rank": rank, "grad": grad, "bucket_bytes": ddp.bucket_bytes_cap,
           "gradient_as_bucket_view": ddp.gradient_as_bucket_view, "broadcast_buffers": ddp.broadcast_buffers,
           "group_outlives_reducer": attrs.index("_last_process_group_ref") > attrs.index("reducer")
           and ddp._last_process_group_ref is ddp.process_group}
    dist.destroy_process_group()
    return out


def rank1_dies():
    """Rank 1 is killed while rank 0 waits for it in a collective."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    time.sleep(600)
    return "unreachable"


def rank_pid():
    """Every rank returns at once."""
    return os.getpid()


def rank0_hangs():
    """Rank 0 never returns; rank 1 returns at once."""
    if os.environ["RANK"] == "0":
        time.sleep(600)
    return os.getpid()
