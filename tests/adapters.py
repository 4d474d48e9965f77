"""Shared test helper: adapters holding non-initial values (B = 0 at creation would hide most bugs)."""
import torch

from lora import adapter_layers


def randomize_adapters(model, scale=0.1):
    """Add N(0, scale^2) noise to every trainable adapter tensor, in adapter_layers order (the caller seeds)."""
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.add_(torch.randn_like(p) * scale)
