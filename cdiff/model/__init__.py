"""The network: eps = UNet(x_t, t, y). Schedules and samplers live outside it (cdiff.schedule, cdiff.samplers)."""

from cdiff.model.attention import CrossAttention
from cdiff.model.blocks import ConvBlock
from cdiff.model.embeddings import PromptEncoder, TimeEmbedding
from cdiff.model.unet import UNet

__all__ = ["ConvBlock", "CrossAttention", "PromptEncoder", "TimeEmbedding", "UNet"]
