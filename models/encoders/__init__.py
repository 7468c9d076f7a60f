"""Image and text encoders with a uniform interface: ``forward_tokens``, ``width``, ``load_pretrained``,
``set_grad_checkpointing`` and ``no_weight_decay``."""
from .text import BertTextEncoder
from .vision import SwinTokens, ViTTokens, build_vision_encoder, read_vision_config

__all__ = ["BertTextEncoder", "SwinTokens", "ViTTokens", "build_vision_encoder", "read_vision_config"]
