"""Solving for the projection P: streamed normal equations, ridge solve, optional Adam refinement."""

from __future__ import annotations

import torch
from torch import nn


def norm_gain(post_norm: nn.Module, dim: int, device: torch.device) -> torch.Tensor:
    """Per-channel gain g of an RMS-style norm: f(u) = g * u / rms(u); f(ones) = g since rms(ones)=1."""
    with torch.no_grad():
        ones = torch.ones(1, dim, device=device, dtype=next(post_norm.parameters()).dtype)
        return post_norm(ones).float().reshape(-1)


class NormalEquations:
    """Running sums of a least-squares fit Y ~= X P: X^T X, X^T Y, sum ||Y||^2 and the row count.

    Adding rows micro-batch by micro-batch gives the same solve as stacking them all, while memory
    stays two d x d float64 matrices however many tokens the fit sees.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.cross = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.target_sq = 0.0
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x64, y64 = x.double(), y.double()
        self.gram += x64.T @ x64
        self.cross += x64.T @ y64
        self.target_sq += float(y64.pow(2).sum())
        self.rows += x.shape[0]

    def __add__(self, other: NormalEquations) -> NormalEquations:
        out = NormalEquations(self.gram.shape[0], self.gram.device)
        out.gram, out.cross = self.gram + other.gram, self.cross + other.cross
        out.target_sq, out.rows = self.target_sq + other.target_sq, self.rows + other.rows
        return out

    def solve(self, ridge: float) -> torch.Tensor:
        """argmin_P ||X P - Y||^2 + lam ||P - I||^2, lam = ridge * trace(X^T X) / d (float64 solve)."""
        d = self.gram.shape[0]
        lam = ridge * float(self.gram.diagonal().mean()) if ridge > 0 else 0.0
        eye = torch.eye(d, dtype=torch.float64, device=self.gram.device)
        return torch.linalg.solve(self.gram + lam * eye, self.cross + lam * eye).float()

    def mse(self, projection: torch.Tensor) -> float:
        """mean over rows and channels of (X P - Y)^2, from the sums alone."""
        if self.rows == 0:
            return float("nan")
        p = projection.to(self.gram).double()
        sq = float((p * (self.gram @ p)).sum()) - 2.0 * float((p * self.cross).sum()) + self.target_sq
        return max(sq, 0.0) / (self.rows * self.gram.shape[0])


def ridge_projection(x: torch.Tensor, t: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_P ||x P - t||^2 + lam ||P - I||^2 with lam = ridge * trace(x^T x)/d (float64 solve)."""
    equations = NormalEquations(x.shape[1], x.device)
    equations.add(x, t)
    return equations.solve(ridge)


def apply_writer(z: torch.Tensor, projection: torch.Tensor, post_norm: nn.Module | None) -> torch.Tensor:
    out = z @ projection
    if post_norm is None:
        return out
    return post_norm(out.to(next(post_norm.parameters()).dtype)).float()


def design_rows(
    z: torch.Tensor, residual: torch.Tensor, target: torch.Tensor, post_norm: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, Y) of the linear fit Y ~= X P that makes residual + post_norm(z P) ~= target."""
    want = target - residual
    if post_norm is None:
        return z, want
    # Linearise the norm around P = I: post_norm(zP) ~= g * (z/rms(z)) P, exact at P = I.
    gain = norm_gain(post_norm, z.shape[1], z.device)
    gain = torch.where(gain.abs() < 1e-3, torch.full_like(gain, 1e-3), gain)
    eps = getattr(post_norm, "eps", getattr(post_norm, "variance_epsilon", 1e-6))
    rms = z.pow(2).mean(dim=-1, keepdim=True).add(eps).sqrt()
    return z / rms, want / gain


def fit_projection(
    z: torch.Tensor,
    residual: torch.Tensor,
    target: torch.Tensor,
    post_norm: nn.Module | None,
    ridge: float,
    refine_steps: int = 0,
    refine_lr: float = 1e-4,
) -> torch.Tensor:
    """P such that residual + post_norm(z P) ~= target (rows are tokens)."""
    projection = ridge_projection(*design_rows(z, residual, target, post_norm), ridge)
    if refine_steps > 0:
        projection = refine_projection(z, residual, target, post_norm, projection, ridge, refine_steps, refine_lr)
    return projection


def refine_projection(
    z: torch.Tensor,
    residual: torch.Tensor,
    target: torch.Tensor,
    post_norm: nn.Module | None,
    start: torch.Tensor,
    ridge: float,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """A few Adam steps on mean ||residual + f(zP) - target||^2 + lam/n ||P - I||^2, keeping the best."""
    projection = start.clone().requires_grad_(True)
    eye = torch.eye(start.shape[0], device=start.device)
    scale = float(target.pow(2).mean()) or 1.0
    lam = ridge * float(z.pow(2).sum(dim=0).mean()) / z.shape[0]
    optimiser = torch.optim.Adam([projection], lr=lr)
    best = (float("inf"), start)

    def objective() -> torch.Tensor:
        fit = (residual + apply_writer(z, projection, post_norm) - target).pow(2).mean() / scale
        return fit + lam * (projection - eye).pow(2).mean() / scale

    # Only P is trained: the norm's own weights must not collect gradients.
    norm_params = list(post_norm.parameters()) if post_norm is not None else []
    flags = [p.requires_grad for p in norm_params]
    try:
        for p in norm_params:
            p.requires_grad_(False)
        for _ in range(steps + 1):
            optimiser.zero_grad()
            loss = objective()
            value = float(loss.detach())
            if value < best[0]:
                best = (value, projection.detach().clone())
            loss.backward()
            optimiser.step()
    finally:
        for p, flag in zip(norm_params, flags, strict=True):
            p.requires_grad_(flag)
    return best[1]
