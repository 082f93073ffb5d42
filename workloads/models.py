"""Reference models used by the examples, the benchmarks and the tests."""
from __future__ import annotations

import torch
from torch import nn


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def _down(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class FashionCNN(nn.Module):
    """Small ResNet-style CNN for 1x28x28 images, 10 classes (about 116k parameters).

    28x28x16 -> 14x14x32 (+ residual block) -> 7x7x64 (+ residual block) -> pool -> linear.
    """

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _down(1, w, 1),
            _down(w, 2 * w, 2),
            _Residual(2 * w),
            _down(2 * w, 4 * w, 2),
            _Residual(4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LSTMLanguageModel(nn.Module):
    """Word-level LM: embedding, 2-layer LSTM, linear decoder (11.4M parameters at the defaults:
    most of them in the 10k x 256 embedding and the 512 x 10k decoder, the communication-bound case)."""

    def __init__(self, vocab: int = 10_000, emb: int = 256, hidden: int = 512, layers: int = 2,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=layers, batch_first=True, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, vocab) logits."""
        out, _ = self.lstm(self.drop(self.embedding(tokens)))
        return self.decoder(self.drop(out))


class TransformerLanguageModel(nn.Module):
    """Small causal Transformer LM: token embedding, learned positions, pre-norm blocks of
    self-attention and a feed-forward network, a decoder tied to nothing (so the embedding and the
    decoder are separate layers the allocator can tell apart). About 3.0M parameters at the
    defaults, 2.57M of them in the embedding and the decoder."""

    def __init__(self, vocab: int = 10_000, dim: int = 128, heads: int = 4, layers: int = 2, ffn: int = 512,
                 context: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(context, dim)
        block = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, vocab)
        self.context = context

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, seq <= context) token ids -> (batch, seq, vocab) logits; position t sees tokens <= t."""
        seq = tokens.shape[1]
        if seq > self.context:
            raise ValueError(f"sequence of {seq} tokens is longer than the model's context {self.context}")
        pos = torch.arange(seq, device=tokens.device)
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=tokens.device)
        h = self.blocks(self.embedding(tokens) + self.position(pos), mask=mask, is_causal=True)
        return self.decoder(self.norm(h))
