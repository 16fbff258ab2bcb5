"""The shared training loop: best-epoch selection and the weights' moving average."""

from __future__ import annotations

import copy

import torch
from torch import nn

from training.images import Recipe
from training.loop import fit


def _recipe(epochs: int = 3, ema: float = 0.0) -> Recipe:
    return Recipe(epochs=epochs, lr=0.05, batch=16, weight_decay=0.0, ema=ema)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_with_ema_the_kept_weights_are_the_moving_average_of_the_steps() -> None:
    x, y = _data()
    validated: list[nn.Module] = []

    def validate(m: nn.Module) -> float:
        validated.append(m)
        return float((m(x).argmax(1) == y).float().mean())

    initial = nn.Linear(4, 2)
    start = initial.weight.detach().clone()
    plain, _, _ = fit(copy.deepcopy(initial), x, y, validate=lambda m: 0.0, recipe=_recipe(epochs=1),
                      seed=1, title="plain")
    model = copy.deepcopy(initial)
    averaged, history, _ = fit(model, x, y, validate=validate, recipe=_recipe(epochs=1, ema=0.5), seed=1,
                               title="ema")
    # The same steps as without the average (same seed), but what is validated and kept is the
    # average: not the model being trained, and not its last step's weights.
    assert all(m is not model for m in validated) and len(history["val accuracy"]) == 1
    assert not torch.equal(averaged.weight, plain.weight)
    # An average of the steps lies between the start and the last step, weighted to the last ones.
    last = plain.weight
    assert torch.linalg.norm(averaged.weight - last) < torch.linalg.norm(start - last)


def test_without_ema_the_best_epoch_is_kept() -> None:
    x, y = _data()
    scores = iter([0.5, 0.9, 0.7])
    seen: list[torch.Tensor] = []

    def validate(m: nn.Module) -> float:
        seen.append(m.weight.detach().clone())
        return next(scores)

    model, history, _ = fit(nn.Linear(4, 2), x, y, validate=validate, recipe=_recipe(), seed=0, title="t")
    assert history["val accuracy"] == [0.5, 0.9, 0.7]
    assert torch.equal(model.weight, seen[1]) and not model.training
