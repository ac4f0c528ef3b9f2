"""A DistilBERT-base encoder built from a `transformers` config, random weights, sequence 128."""
import torch

SEQ = 128


class DistilBertEncoder(torch.nn.Module):
    """Returns the last hidden state as a tensor (ONNX/TorchScript-friendly output)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import DistilBertConfig, DistilBertModel

        self.bert = DistilBertModel(DistilBertConfig())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def build_model() -> torch.nn.Module:
    return DistilBertEncoder()


def example_inputs(batch_size: int = 1, seq_len: int = SEQ) -> tuple:
    ids = torch.randint(0, 30522, (batch_size, seq_len))
    return ids, torch.ones(batch_size, seq_len, dtype=torch.long)
