"""A small transformer text encoder with a variable sequence length (self-contained).

    autotiacc tune examples/transformer.py --budget 2m
"""
import torch
from torch import nn

VOCAB = 1000


class TextEncoder(nn.Module):
    def __init__(self, d_model: int = 128, heads: int = 4, layers: int = 2, max_len: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.encoder(self.embed(tokens) + self.pos(pos))
        return self.head(h.mean(dim=1))


def build_model() -> nn.Module:
    return TextEncoder()


def example_inputs(batch_size: int = 1, seq_len: int = 64) -> tuple:
    return (torch.randint(0, VOCAB, (batch_size, seq_len)),)
