"""The benchmark models (torch only, no MLflow, no servers): shared by bench/serving_bench.py, which trains and
releases them, and bench/gpu_check.py, which runs them through the handler on a GPU."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TEXT_VOCAB, TEXT_SEQ, TEXT_D, TEXT_HEADS, TEXT_LAYERS, TEXT_CLASSES = 2000, 96, 192, 4, 3, 4


class DigitsCNN(nn.Module):
    """A CNN on sklearn's digits behind the tabular contract: 64 floats in, 10 logits out. The rows are reshaped to
    1x8x8 and upsampled to 32x32 inside the model, then 4 convolutions (32-64 channels): about 2 ms per 1-row
    inference on one CPU core, so compute is a real share of a request."""

    def __init__(self) -> None:
        super().__init__()
        conv = [nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*conv)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = (x / 16.0).reshape(x.shape[0], 1, 8, 8)
        img = nn.functional.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)
        return self.head(self.features(img))


class TextClassifier(nn.Module):
    """A pre-norm ``nn.TransformerEncoder`` text classifier: token embedding + learned positions, 3 layers,
    d_model 192, 4 heads, mean pooling, linear head. Token ids travel as the tabular contract's floats."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(TEXT_VOCAB, TEXT_D)
        self.positions = nn.Parameter(torch.randn(TEXT_SEQ, TEXT_D) * 0.02)
        layer = nn.TransformerEncoderLayer(TEXT_D, TEXT_HEADS, dim_feedforward=2 * TEXT_D, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, TEXT_LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(TEXT_D)
        self.head = nn.Linear(TEXT_D, TEXT_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long().clamp(0, TEXT_VOCAB - 1)  # token ids travel as floats (exact below 2**24)
        return self.head(self.norm(self.encoder(self.tokens(ids) + self.positions).mean(dim=1)))


def text_dataset(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Token-id rows (as float32: the tabular contract) of random "words" with 8-16 keywords of their class each:
    class k's keywords are ids 1+5k .. 5+5k, ordinary words 50..VOCAB-1."""
    x = rng.integers(50, TEXT_VOCAB, size=(n, TEXT_SEQ))
    y = rng.integers(0, TEXT_CLASSES, size=n)
    for i in range(n):
        k = int(rng.integers(8, 17))
        x[i, rng.choice(TEXT_SEQ, size=k, replace=False)] = 1 + 5 * y[i] + rng.integers(0, 5, size=k)
    return x.astype(np.float32), y


def tabular_mlp(n_features: int = 30, n_classes: int = 2) -> nn.Module:
    """The shape of canaryflow.demo's MLP (30-64-32-2 on breast-cancer): HTTP dominates its serving cost."""
    return nn.Sequential(nn.Linear(n_features, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, n_classes))
