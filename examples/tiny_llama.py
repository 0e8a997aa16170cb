"""Write a tiny Llama with random weights to a local folder (HF format), for trying `layerwise train`.

    python examples/tiny_llama.py tiny-llama        # then: layerwise train --model tiny-llama ...

Nothing is downloaded: the model is built from a config. Its vocabulary holds layerwise train's
byte-level tokenizer (UTF-8 bytes + an end-of-document token: 257 ids), used when --tokenizer is
not given, padded to 320 so that tensor parallelism (--tp 2, 4, 5) can split it evenly.
"""

from __future__ import annotations

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(folder: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    print(f"wrote a tiny Llama ({sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6:.2f}M parameters) to {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama")
