"""Test oracles for the split models: the unsplit network a split model is cut from, and its state dict split at a
cut or merged back (the keys of build_unsplit_model's network)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn as nn

from models.bottleneck import CLIENT_BOTTLENECK, SERVER_BOTTLENECK
from models.split import BACKBONE_PREFIX, SplitModel, UnsplitNet, check_cutlayer, unit_names


def merge_split(split: SplitModel) -> UnsplitNet:
    """The unsplit network made of the split model's modules (shared, not copied): client units then server."""
    units = list(split.client.named_children()) + list(split.server.backbone.named_children())
    names = [name for name, _ in units]
    if [name for name in names if name not in (CLIENT_BOTTLENECK, SERVER_BOTTLENECK)] != unit_names(split.arch):
        raise ValueError(f"client and server units do not form a {split.arch} backbone")
    has_dropped_shortcut = any(getattr(module, "residual", True) is False for _, module in split.client.named_children())
    return UnsplitNet(nn.Sequential(OrderedDict(units)), split.server.head, split.server.prototypes,
                      split.server.feature_dim, split.arch, split.cutlayer if has_dropped_shortcut else None,
                      split.cutlayer if CLIENT_BOTTLENECK in names else None)


def split_state_dict(unsplit_state: Mapping[str, torch.Tensor], arch: str,
                     cutlayer: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(client_state, server_state) for a split at `cutlayer` from an unsplit model's state dict."""
    check_cutlayer(arch, cutlayer)
    client_units = set(unit_names(arch)[:cutlayer]) | {CLIENT_BOTTLENECK}
    client_state: dict[str, torch.Tensor] = {}
    server_state: dict[str, torch.Tensor] = {}
    for key, value in unsplit_state.items():
        if key.startswith(BACKBONE_PREFIX) and key[len(BACKBONE_PREFIX):].split(".", 1)[0] in client_units:
            client_state[key[len(BACKBONE_PREFIX):]] = value
        else:
            server_state[key] = value
    return client_state, server_state


def merge_state_dicts(client_state: Mapping[str, torch.Tensor],
                      server_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An unsplit model's state dict from a client state dict and a server state dict."""
    merged = {BACKBONE_PREFIX + key: value for key, value in client_state.items()}
    overlap = merged.keys() & server_state.keys()
    if overlap:
        raise ValueError(f"client and server both hold {sorted(overlap)[0]}")
    merged.update(server_state)
    return merged
