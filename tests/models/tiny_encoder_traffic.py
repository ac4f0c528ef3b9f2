"""Tiny masked transformer encoder with traffic() and pad_inputs(): the dynamic-shape contract."""
import torch
from torch import nn

VOCAB, MAX_LEN = 50, 64


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.pos = nn.Embedding(MAX_LEN, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.encoder(self.embed(tokens) + self.pos(pos), src_key_padding_mask=pad_mask)
        keep = (~pad_mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0))


def build_model() -> nn.Module:
    return TinyEncoder()


def example_inputs(batch_size: int = 1, seq_len: int = 8) -> tuple:
    return torch.randint(1, VOCAB, (batch_size, seq_len)), torch.zeros(batch_size, seq_len, dtype=torch.bool)


def pad_inputs(inputs: tuple, seq_len: int) -> tuple:
    tokens, mask = inputs
    extra = seq_len - tokens.shape[1]
    if extra <= 0:
        return inputs
    return (torch.nn.functional.pad(tokens, (0, extra), value=0),
            torch.nn.functional.pad(mask, (0, extra), value=True))


def traffic() -> list:
    return [{"batch_size": b, "seq_len": s, "weight": w}
            for b, s, w in ((1, 5, 4), (1, 12, 3), (2, 12, 2), (2, 30, 1), (3, 40, 1))]
