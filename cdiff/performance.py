"""Speed switches for training and sampling: bf16 autocast, channels_last, torch.compile, fused AdamW.

All are off by default, as suits a CPU: bf16 on a CPU without native bf16 dot products is far slower
than fp32, and compiling costs more time than short CPU runs save. On a GPU, turn them on in params
(train.*.precision/channels_last/compile, sample.precision/compile).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn


def autocast(device, precision: str):
    """bf16 autocast on `device` for precision 'bf16'; a no-op context for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """Conv weights in NHWC (channels_last) or back in the default NCHW layout; in place, returns the model."""
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step when the parameters are on a CUDA device."""
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


class CompiledOrEager:
    """Calls torch.compile(module); if compiling fails on the first call, warns once and runs eager from then on.

    A failure after the first call is a real error and is raised. The eager module stays reachable as
    `.module`, so state dicts and attributes (prompt, config) are the model's own.
    """

    def __init__(self, module: nn.Module, **compile_kwargs):
        self.module = module
        self._compiled = torch.compile(module, **compile_kwargs)
        self._checked = False

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            return self.module(*args, **kwargs)
        if self._checked:
            return self._compiled(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as e:  # inductor needs a C++ compiler on CPU, Triton on GPU: fall back, do not fail
            message = f"torch.compile failed, running eager: {type(e).__name__}: {str(e).splitlines()[0]}"
            warnings.warn(message, stacklevel=2)
            self._compiled = None
            return self.module(*args, **kwargs)
        self._checked = True
        return out

    def __getattr__(self, name):
        return getattr(self.module, name)


def maybe_compile(module: nn.Module, enabled: bool, mode: str = "default", **compile_kwargs):
    """`module` itself, or a CompiledOrEager wrapper of it, compiled in `mode` (torch.compile's).

    mode "reduce-overhead" replays the compiled forward (and, in training, backward) as CUDA graphs: one
    launch per graph instead of one per kernel, what a small model on a large GPU needs. On a CPU the mode
    only picks inductor's options; there are no graphs to capture.
    """
    if not enabled:
        return module
    return CompiledOrEager(module, **({} if mode == "default" else {"mode": mode}), **compile_kwargs)


class InferenceModel(nn.Module):
    """A network for sampling: its forward under autocast (output back in float32), compiled if asked, and
    run `call_batch` rows at a time (0: the whole batch at once).

    A CPU computes a batch that fits its cache faster per image than one that does not: on 2 Xeon cores a
    call of 500 rows costs 2.6 ms per image and calls of 64 rows 1.85 ms, and 300 guided DPM++-20 images
    took 22.7 s instead of 31.4 (bench/sampling_calls.py: the same images, bit for bit). Each row's output does not depend on the
    rows beside it, so the split changes no image beyond float rounding (on the bench's Xeon, at 64 rows not even that).
    Samplers only call model(x, t, y) and read model.prompt / model.config, which this forwards.
    """

    def __init__(
        self,
        model: nn.Module,
        precision: str = "fp32",
        compile: bool = False,
        compile_mode: str = "default",
        call_batch: int = 0,
    ):
        super().__init__()
        if call_batch < 0:
            raise ValueError(f"call_batch must be >= 0, got {call_batch}")
        self.model, self.precision, self.call_batch = model, precision, call_batch
        self._forward = maybe_compile(model, compile, compile_mode, dynamic=False)

    @property
    def prompt(self):
        return self.model.prompt

    @property
    def config(self):
        return self.model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = self.call_batch or len(x)
        if len(x) <= n:
            return self._call(x, t, y)
        return torch.cat([self._call(*rows) for rows in zip(x.split(n), t.split(n), y.split(n), strict=True)])

    def _call(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.precision):
            return self._forward(x, t, y).float()
