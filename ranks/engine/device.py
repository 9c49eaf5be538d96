"""Small host values onto the device without stalling the host (the sampler, the grammar masks and
the model runner share it)."""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A small host list as a tensor on `device`, copied from pinned memory without a wait: a
    blocking copy would wait for every kernel queued before it, the step's forward included."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)
