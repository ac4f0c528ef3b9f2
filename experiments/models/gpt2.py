"""A GPT-2 small decoder (124M) built from a `transformers` config, random weights, 128 tokens,
no KV cache: one forward over the prompt."""
import torch

SEQ = 128


class GPT2Decoder(torch.nn.Module):
    """Returns the last hidden state as a tensor (ONNX/TorchScript-friendly output)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.gpt2 = GPT2Model(GPT2Config(use_cache=False))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=input_ids).last_hidden_state


def build_model() -> torch.nn.Module:
    return GPT2Decoder()


def example_inputs(batch_size: int = 1, seq_len: int = SEQ) -> tuple:
    return (torch.randint(0, 50257, (batch_size, seq_len)),)
