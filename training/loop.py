"""The training loop every task's classifiers share: AdamW with a one-cycle schedule, per-epoch
numbers printed, and the weights of the epoch with the best validation accuracy kept. With a
recipe's `ema`, those weights are an exponential moving average of the steps' (BatchNorm's running
statistics averaged too), which generalise beyond the training distribution better than the last
step's, and vary less from seed to seed.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


class Recipe(Protocol):
    epochs: int
    lr: float  # peak of the one-cycle schedule
    batch: int
    weight_decay: float
    label_smoothing: float
    bf16: bool  # bfloat16 autocast for the forward pass; evaluation stays FP32
    ema: float  # decay of the weights' moving average per step; 0: the plain weights


def fit(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    validate: Callable[[nn.Module], float],
    recipe: Recipe,
    seed: int,
    title: str,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    pct_start: float = 0.25,
) -> tuple[nn.Module, dict[str, list[float]], float]:
    """Train `model`; return it (eval mode, best epoch's weights), its history and the seconds spent.

    `augment(batch, generator)` transforms each training batch; `validate(model)` gives the
    validation accuracy after each epoch.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(x_train) / recipe.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=recipe.epochs * steps,
                                                   pct_start=pct_start)
    history: dict[str, list[float]] = {"train loss": [], "train accuracy": [], "val accuracy": []}
    averaged = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema), use_buffers=True)
        if recipe.ema else None)
    kept = model if averaged is None else averaged.module  # what is validated and returned
    best, best_acc = copy.deepcopy(kept.state_dict()), -1.0
    started = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total_loss, correct = 0.0, 0
        bar = tqdm(range(steps), desc=f"{title} epoch {epoch}/{recipe.epochs}", leave=False, mininterval=1)
        for step in bar:
            idx = order[step * recipe.batch:(step + 1) * recipe.batch]
            x, y = x_train[idx], y_train[idx]
            if augment is not None:
                x = augment(x, gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if averaged is not None:
                averaged.update_parameters(model)
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        val_acc = validate(kept)
        history["train loss"].append(total_loss / len(x_train))
        history["train accuracy"].append(correct / len(x_train))
        history["val accuracy"].append(val_acc)
        if val_acc > best_acc:
            best, best_acc = copy.deepcopy(kept.state_dict()), val_acc
        print(f"{title} epoch {epoch:2d}/{recipe.epochs}: train loss {history['train loss'][-1]:.4f}, "
              f"train acc {correct / len(x_train):.2%}, val acc {val_acc:.2%}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    seconds = time.perf_counter() - started
    model.load_state_dict(best)
    model.eval()
    print(f"{title}: best val acc {best_acc:.2%} (epoch {history['val accuracy'].index(best_acc) + 1}), "
          f"trained in {seconds:.0f} s")
    return model, history, seconds
