"""Problems with a known gradient noise scale, shared by the noise tests (no tests here).

Linear least squares on a finite dataset of N examples: with the parameters fixed, the
per-example gradient is g_j = r_j * [x_j, 1] (r_j the residual), so G = mean_j g_j and
Sigma = the population covariance of the g_j are exact numbers. Batches are drawn WITH
replacement, which makes the examples of a batch i.i.d. draws from that finite population and
E|G_B|^2 = |G|^2 + tr(Sigma)/B hold exactly, so B_simple = tr(Sigma)/|G|^2 is the answer every
estimator must find.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from batchscope.workload import Workload

N_EXAMPLES = 160
FEATURE_SCALES = (1.0, 4.0, 0.25, 1.0)


def linear_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    scales = torch.tensor(FEATURE_SCALES)
    x = torch.randn(N_EXAMPLES, len(FEATURE_SCALES), generator=generator) * scales
    true_w = torch.tensor([1.0, -0.5, 2.0, 0.3])
    y = x @ true_w + 0.8 * torch.randn(N_EXAMPLES, generator=generator)
    return x, y


def linear_model(device: torch.device | str = "cpu") -> nn.Linear:
    """Fixed parameters, away from the optimum (so |G| is clearly non-zero)."""
    model = nn.Linear(len(FEATURE_SCALES), 1).to(device)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.9, -0.45, 1.5, 0.4]]))
        model.bias.fill_(0.2)
    return model


def linear_workload(
    reduction: Literal["mean", "sum"] = "mean",
    optimizer: Literal["sgd", "adam"] = "sgd",
    unit: Literal["examples", "tokens"] = "examples",
) -> Workload:
    x, y = linear_data()

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch[0], batch[1]
        squared = 0.5 * (model(inputs).squeeze(-1) - targets) ** 2
        return squared.sum() if reduction == "sum" else squared.mean()

    def make_batch(batch_size: int, device: torch.device, generator: torch.Generator):
        index = torch.randint(N_EXAMPLES, (batch_size,), generator=generator)
        batch = (x[index].to(device), y[index].to(device))
        if unit == "tokens":  # pretend example j has 3 + (j mod 4) tokens
            return batch + ((index % 4 + 3).to(device),)
        return batch

    def build_optimizer(params, lr: float) -> torch.optim.Optimizer:
        if optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr)

    return Workload(
        name=f"linear-{reduction}-{optimizer}",
        build_model=linear_model,
        build_optimizer=build_optimizer,
        loss=loss,
        make_batch=make_batch,
        reference_batch_size=16,
        reference_lr=0.05 if optimizer == "adam" else 0.01,
        loss_reduction=reduction,
        optimizer_family=optimizer,
        unit=unit,
        count=(lambda batch: int(batch[2].sum())) if unit == "tokens" else None,
        schedule="constant",
    )


def linear_workload_at_the_optimum() -> Workload:
    """`linear_workload()` started at the exact least-squares solution: the true gradient is 0,
    so B_noise = tr(Sigma)/|G|^2 is infinite and only a lower bound can be measured."""
    x, y = (t.double() for t in linear_data())
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)

    def build_model(device: torch.device | str) -> nn.Linear:
        model = linear_model(device)
        with torch.no_grad():
            model.weight.copy_(solution[:-1].float().unsqueeze(0))
            model.bias.fill_(float(solution[-1]))
        return model

    return linear_workload().with_settings(build_model=build_model)


def entry_point() -> Workload:
    """`test_noise_problems:entry_point` for CLI tests."""
    return linear_workload()


def at_the_optimum_entry_point() -> Workload:
    """`test_noise_problems:at_the_optimum_entry_point` for CLI tests."""
    return linear_workload_at_the_optimum()


def per_example_gradients(model: nn.Linear, preconditioner: np.ndarray | None = None) -> np.ndarray:
    """(N, d+1) exact per-example gradients of the mean loss at the model's parameters, float64."""
    x, y = (t.double().numpy() for t in linear_data())
    w = model.weight.detach().double().cpu().numpy().reshape(-1)
    c = float(model.bias.detach().double().cpu())
    residual = x @ w + c - y
    grads = np.concatenate([residual[:, None] * x, residual[:, None]], axis=1)
    if preconditioner is not None:
        grads = grads / preconditioner
    return grads


def analytic_noise(model: nn.Linear, preconditioner: np.ndarray | None = None) -> dict[str, float]:
    """|G|^2, tr(Sigma) and B_simple over the finite dataset (population covariance, since
    batches sample with replacement)."""
    grads = per_example_gradients(model, preconditioner)
    mean = grads.mean(axis=0)
    g2 = float(mean @ mean)
    trace = float(((grads - mean) ** 2).sum(axis=1).mean())
    return {"grad_sq_norm": g2, "trace_sigma": trace, "b_simple": trace / g2}


def adam_preconditioner(model: nn.Linear, optimizer: torch.optim.Adam) -> np.ndarray:
    """sqrt(v_hat) + eps per coordinate, in the [weight..., bias] order of `per_example_gradients`."""
    parts = []
    for param in (model.weight, model.bias):
        state = optimizer.state[param]
        beta2 = optimizer.param_groups[0]["betas"][1]
        eps = optimizer.param_groups[0]["eps"]
        v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** float(state["step"]))
        parts.append((v_hat.sqrt() + eps).reshape(-1).numpy())
    return np.concatenate(parts)


class SmallMLP(nn.Module):
    """A small non-linear network (no BatchNorm, so per-example gradients are defined)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(len(FEATURE_SCALES), 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def mlp_workload() -> Workload:
    x, y = linear_data()

    def build_model(device: torch.device) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(7)
            return SmallMLP().to(device)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((model(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()

    def make_batch(batch_size: int, device: torch.device, generator: torch.Generator):
        index = torch.randint(N_EXAMPLES, (batch_size,), generator=generator)
        return x[index].to(device), y[index].to(device)

    return Workload(
        name="small-mlp",
        build_model=build_model,
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        loss=loss,
        make_batch=make_batch,
        reference_batch_size=16,
        reference_lr=0.01,
        schedule="constant",
    )


def mlp_exact_noise(model: nn.Module) -> dict[str, float]:
    """Exact |G|^2, tr(Sigma), B_simple of the MLP over the finite dataset (per-example
    gradients by a plain loop, independent of the probe's vmap code)."""
    x, y = linear_data()
    rows = []
    for j in range(N_EXAMPLES):
        model.zero_grad(set_to_none=True)
        (0.5 * (model(x[j : j + 1]).squeeze(-1) - y[j : j + 1]) ** 2).mean().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy())
    model.zero_grad(set_to_none=True)
    grads = np.stack(rows)
    mean = grads.mean(axis=0)
    g2 = float(mean @ mean)
    trace = float(((grads - mean) ** 2).sum(axis=1).mean())
    return {"grad_sq_norm": g2, "trace_sigma": trace, "b_simple": trace / g2}
