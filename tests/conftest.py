"""Shared fixtures: a tiny trained tokenizer and small models, built once per session."""
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TOY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Hello world! Hello there, how are you doing today? I am doing well, thank you.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 34))\n",
    "In 2024 the temperature was 21.5 degrees; in 2025 it rose to 23.75 degrees.",
    "What is 12*3? Let me compute 12*3 = 36. The answer is 36.",
    "the theory of the thing is that there is nothing other than the other thing",
] * 20

TINY_VOCAB = 256 + 9 + 55  # 320: a multiple of 64, so no vocab padding


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(iter(TOY_CORPUS), TINY_VOCAB)


def perturbed(model, scale=0.05, seed=0):
    """Zero-initialised projections make a fresh model nearly trivial; add noise so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return model
