"""A few AdamW steps on one batch of windows: the tests' check that a formulation learns."""

import torch

from robovlms.data.windows import WindowDataset


def train_briefly(formulation, store, steps=15):
    """The losses of `steps` AdamW steps on one batch of windows, and the last step's metrics."""
    batch = WindowDataset(store, formulation.history, formulation.chunk).__getitems__(list(range(0, 48, 6)))
    optimiser = torch.optim.AdamW(formulation.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss, metrics = formulation.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses, metrics
