"""A transformer text encoder served with variable batch sizes (1-4) and lengths (9-250).

Dynamic-shape tuning example: `traffic()` is the production shape mix, `pad_inputs()` pads the
sequence dimension so that padded results equal unpadded ones for the real rows (the model takes
a padding mask and mean-pools only over real tokens).

    autotiacc tune examples/text_encoder_traffic.py --budget 10m
"""
import torch
from torch import nn

VOCAB = 1000
MAX_LEN = 256


class MaskedTextEncoder(nn.Module):
    def __init__(self, d_model: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(MAX_LEN, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 2)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        # pad_mask: True where the position is padding; padded keys get no attention weight.
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.encoder(self.embed(tokens) + self.pos(pos), src_key_padding_mask=pad_mask)
        keep = (~pad_mask).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # mean over real tokens only
        return self.head(pooled)


def build_model() -> nn.Module:
    return MaskedTextEncoder()


def example_inputs(batch_size: int = 1, seq_len: int = 64) -> tuple:
    tokens = torch.randint(1, VOCAB, (batch_size, seq_len))
    return tokens, torch.zeros(batch_size, seq_len, dtype=torch.bool)


def pad_inputs(inputs: tuple, seq_len: int) -> tuple:
    """Pad to `seq_len` tokens: token 0 at the end, marked as padding in the mask."""
    tokens, pad_mask = inputs
    extra = seq_len - tokens.shape[1]
    if extra <= 0:
        return inputs
    tokens = torch.nn.functional.pad(tokens, (0, extra), value=0)
    pad_mask = torch.nn.functional.pad(pad_mask, (0, extra), value=True)
    return tokens, pad_mask


def traffic() -> list[dict]:
    """Short requests dominate, a long tail up to 250 tokens; batch sizes 1-4."""
    mix = []
    for seq_len, w_len in ((9, 6), (16, 10), (24, 9), (37, 8), (50, 6), (64, 5), (90, 4), (128, 3),
                           (180, 2), (250, 1)):
        for batch_size, w_batch in ((1, 5), (2, 3), (4, 2)):
            mix.append({"batch_size": batch_size, "seq_len": seq_len, "weight": float(w_len * w_batch)})
    return mix
