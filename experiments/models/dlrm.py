"""A DLRM-style recommender: embedding bags for sparse features, MLPs, pairwise interaction.

The seed's "recommendation" scenario; sizes are kept small enough for a 2-core machine.
"""
import torch
from torch import nn

TABLES, ROWS, DIM, DENSE, BAG = 8, 20000, 32, 13, 4


class DLRM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(DENSE, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, DIM), nn.ReLU())
        self.tables = nn.ModuleList(nn.EmbeddingBag(ROWS, DIM, mode="sum") for _ in range(TABLES))
        n = TABLES + 1
        self.top = nn.Sequential(nn.Linear(DIM + n * (n - 1) // 2, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(),
                                 nn.Linear(64, 1))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)
        embs = [t(sparse[:, i, :]) for i, t in enumerate(self.tables)]
        feats = torch.stack([x] + embs, dim=1)
        inter = torch.bmm(feats, feats.transpose(1, 2))
        i, j = torch.triu_indices(feats.shape[1], feats.shape[1], offset=1)
        return torch.sigmoid(self.top(torch.cat([x, inter[:, i, j]], dim=1)))


def build_model() -> nn.Module:
    return DLRM()


def example_inputs(batch_size: int = 128) -> tuple:
    return torch.randn(batch_size, DENSE), torch.randint(0, ROWS, (batch_size, TABLES, BAG))
