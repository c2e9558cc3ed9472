"""The noise schedule (not a network): betas, q_sample and the epsilon-prediction loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cdiff.config import DiffusionConfig


def linear_beta_schedule(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped at 0.999."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


class NoiseSchedule:
    """Holds the DDPM constants; `add_noise`/`q_sample` diffuse x0 to x_t in closed form."""

    def __init__(self, config: DiffusionConfig):
        config.validate()
        self.config = config
        self.timesteps = config.timesteps
        if config.beta_schedule == "linear":
            betas = linear_beta_schedule(config.timesteps, config.beta_start, config.beta_end)
        else:
            betas = cosine_beta_schedule(config.timesteps)
        self.betas = betas.float()
        self.alphas = (1 - betas).float()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()  # alpha_bar_t

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    add_noise = q_sample  # diffusers' name


def drop_labels(y: torch.Tensor, p_uncond: float, null_id: int, u: torch.Tensor) -> torch.Tensor:
    """Replace labels by the null prompt where u < p_uncond (u: uniform draws, one per sample)."""
    return torch.where(u < p_uncond, torch.full_like(y, null_id), y)


def diffusion_loss(model, schedule: NoiseSchedule, x0, y, t, noise, u, p_uncond: float, null_id: int) -> torch.Tensor:
    """The epsilon-prediction loss ||eps - eps_theta(x_t, t, y)||^2 with label dropout for guidance.

    All randomness (t, noise, u) is passed in, so a caller can draw it from a seeded generator
    and split one global batch over workers without changing the numbers.
    """
    x_t = schedule.q_sample(x0, t, noise)
    return F.mse_loss(model(x_t, t, drop_labels(y, p_uncond, null_id, u)), noise)
