"""The noise schedule (not a network): betas, q_sample, the prediction types and the training loss.

A network may predict the noise eps, the clean image x0, or the velocity v = alpha_t eps - sigma_t x0
(Salimans & Ho 2022), with alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t). The three are affine
in each other given x_t, so a sampler turns any of them into (x0, eps) with `predict_start_and_noise`.
"""

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
    """Holds the DDPM constants and the model's prediction type; `q_sample` diffuses x0 to x_t in closed form."""

    def __init__(self, config: DiffusionConfig):
        config.validate()
        self.config = config
        self.timesteps = config.timesteps
        self.prediction = config.prediction
        if config.beta_schedule == "linear":
            betas = linear_beta_schedule(config.timesteps, config.beta_start, config.beta_end)
        else:
            betas = cosine_beta_schedule(config.timesteps)
        self.betas = betas.float()
        self.alphas = (1 - betas).float()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()  # alpha_bar_t

    def _coef(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) at t, shaped to broadcast over `like`: (B, 1, 1, 1)."""
        a = self.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.dim() - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        alpha, sigma = self._coef(t, x0)
        return alpha * x0 + sigma * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), per time step: (B,)."""
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, eq. 9 with alpha^2 + sigma^2 = 1)."""
        alpha, sigma = self._coef(t, x0)
        return alpha * noise - sigma * x0

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._coef(t, x_t)
        return (x_t - sigma * eps) / alpha

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._coef(t, x_t)
        return (x_t - alpha * x0) / sigma

    def predict_start_and_noise(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor):
        """(x0, eps) from the network's output, whatever it predicts."""
        alpha, sigma = self._coef(t, x_t)
        if self.prediction == "eps":
            return (x_t - sigma * output) / alpha, output
        if self.prediction == "x0":
            return output, (x_t - alpha * output) / sigma
        # v: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at (x0, t, noise)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.velocity(x0, t, noise)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of the MSE in the prediction's space: (B,).

        Min-SNR-gamma (Hang et al. 2023) weights the x0 error by min(SNR_t, gamma). The eps error is SNR_t
        times the x0 error and the v error (SNR_t + 1) times it, so those losses get min(SNR, gamma) / SNR and
        min(SNR, gamma) / (SNR + 1). gamma = 0 turns it off (all weights 1).
        """
        gamma = self.config.min_snr_gamma
        if gamma <= 0:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "x0":
            return clipped
        return clipped / (snr + 1)


def drop_labels(y: torch.Tensor, p_uncond: float, null_id: int, u: torch.Tensor) -> torch.Tensor:
    """Replace labels by the null prompt where u < p_uncond (u: uniform draws, one per sample)."""
    return torch.where(u < p_uncond, torch.full_like(y, null_id), y)


def diffusion_loss(model, schedule: NoiseSchedule, x0, y, t, noise, u, p_uncond: float, null_id: int) -> torch.Tensor:
    """The weighted MSE sum_i w(t_i) ||target_i - f_theta(x_t, t, y)_i||^2 / B, with label dropout for guidance.

    The target is eps, x0 or v (diffusion.prediction); w is Min-SNR-gamma's weight or 1. All randomness
    (t, noise, u) is passed in, so a caller can draw it from a seeded generator and split one global batch
    over workers without changing the numbers. The loss is computed in float32 even under bf16 autocast.
    """
    x_t = schedule.q_sample(x0, t, noise)
    output = model(x_t, t, drop_labels(y, p_uncond, null_id, u)).float()
    if schedule.config.min_snr_gamma <= 0:
        return F.mse_loss(output, schedule.target(x0, t, noise))
    per_sample = F.mse_loss(output, schedule.target(x0, t, noise), reduction="none").flatten(1).mean(1)  # (B,)
    return (schedule.loss_weight(t) * per_sample).mean()
