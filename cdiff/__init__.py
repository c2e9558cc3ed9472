"""cdiff: class-conditional diffusion with cross-attention and LoRA domain adapters (pure PyTorch)."""

__version__ = "0.1.0"
