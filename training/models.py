"""Built-in models and the hook for a user's own: ``model.name: package.module:factory``.

Every model maps a float32 feature batch [B, F] to class logits [B, C]. A custom factory is
called as ``factory(in_features=F, num_classes=C, **model.kwargs)`` and returns an nn.Module.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from training.config import MLPSection, ModelSection, TransformerSection


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, cfg: MLPSection):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for hidden in cfg.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TabularTransformer(nn.Module):
    """Splits the feature vector into ``tokens`` chunks, embeds each, and runs a Transformer
    encoder over them: the shape of attention-based tabular models (FT-Transformer-like)."""

    def __init__(self, in_features: int, num_classes: int, cfg: TransformerSection):
        super().__init__()
        self.tokens = cfg.tokens
        self.chunk = -(-in_features // cfg.tokens)  # ceil: the last chunk is zero-padded
        self.pad = self.chunk * cfg.tokens - in_features
        self.embed = nn.Linear(self.chunk, cfg.d_model)
        self.position = nn.Parameter(torch.zeros(cfg.tokens, cfg.d_model))
        layer = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.n_heads,
            dim_feedforward=4 * cfg.d_model,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, (0, self.pad)).view(len(x), self.tokens, self.chunk)
        hidden = self.encoder(self.embed(x) + self.position)
        return self.head(self.norm(hidden.mean(dim=1)))


def build_model(cfg: ModelSection, in_features: int, num_classes: int) -> nn.Module:
    if cfg.name == "mlp":
        return MLP(in_features, num_classes, cfg.mlp)
    if cfg.name == "transformer":
        return TabularTransformer(in_features, num_classes, cfg.transformer)
    factory = import_factory(cfg.name)
    model = factory(in_features=in_features, num_classes=num_classes, **cfg.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model factory '{cfg.name}' returned {type(model).__name__}, not nn.Module"
        )
    return model


def import_factory(import_string: str):
    module_name, _, attr = import_string.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"model.name '{import_string}': cannot import '{module_name}': {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(
            f"model.name '{import_string}': '{attr}' is not a callable in {module_name}"
        )
    return factory
