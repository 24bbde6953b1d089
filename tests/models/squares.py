"""The shared learnable toy task of the model tests: bright squares on dark noise."""
from __future__ import annotations

import torch


def squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares of random size and position: images uint8 (n, 3, 32, 32), masks float (n, 1, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 40, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    masks = torch.zeros(n, 1, 32, 32)
    for i in range(n):
        s = int(torch.randint(8, 14, (1,), generator=g))
        r, c = torch.randint(0, 32 - s, (2,), generator=g).tolist()
        images[i, :, r : r + s, c : c + s] += 180
        masks[i, 0, r : r + s, c : c + s] = 1
    return images, masks
