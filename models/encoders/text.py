"""BERT text encoder from transformers, sized by a JSON config (PIR's ``config_bert.json``), no pooler."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from utils.weights import LoadReport, WeightsError, load_into, read_state_dict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class BertTextEncoder(BertModel):
    """BertModel with the project's encoder interface; keys stay ``embeddings.*``/``encoder.layer.*`` as in PIR."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, add_pooling_layer=False)

    @classmethod
    def from_json(cls, path: str) -> "BertTextEncoder":
        if not Path(path).is_file():
            raise FileNotFoundError(f"text_config JSON not found: {path}")
        return cls(BertConfig.from_json_file(path))

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.gradient_checkpointing_enable()
        else:
            self.gradient_checkpointing_disable()

    def load_pretrained(self, folder: str) -> LoadReport:
        """Hugging Face BERT weights from a local folder; old ``bert.``/``gamma``/``beta`` names are mapped."""
        files = [Path(folder) / name for name in WEIGHT_FILES if (Path(folder) / name).is_file()]
        if not files:
            raise WeightsError(f"BERT folder {folder} has no weights ({' or '.join(WEIGHT_FILES)})")
        state = {remap_bert_key(k): v for k, v in read_state_dict(files[0], "BERT weights").items()}
        return load_into(self, state, f"text encoder <- {files[0]}", ignore_unexpected=("cls.", "pooler."))


def remap_bert_key(key: str) -> str:
    """Hugging Face / original-TF names -> BertModel names: strip ``bert.``, LayerNorm gamma/beta -> weight/bias."""
    key = key.removeprefix("bert.")
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def has_pretrained_weights(folder: str) -> bool:
    return any((Path(folder) / name).is_file() for name in WEIGHT_FILES)
