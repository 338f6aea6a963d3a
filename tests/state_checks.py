"""Snapshots of a model and its optimizer, to prove a refused step modified nothing."""

from __future__ import annotations

import torch
from torch import nn


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


def assert_unchanged(model: nn.Module, opt: torch.optim.Optimizer, snap: tuple[dict, dict]) -> None:
    params, state = snap
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    assert {id(p): set(s) for p, s in opt.state.items()} == {k: set(v) for k, v in state.items()}
    for p, s in opt.state.items():
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key]), key
