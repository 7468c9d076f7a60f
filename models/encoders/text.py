"""BERT text encoder from transformers, sized by a JSON config (PIR's ``config_bert.json``), no pooler."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import BertConfig, BertModel

from utils.weights import LoadReport, Remapped, StateDict, WeightsError, load_into, read_state_dict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class BertTextEncoder(BertModel):
    """BertModel with the project's encoder interface; keys stay ``embeddings.*``/``encoder.layer.*`` as in PIR."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, add_pooling_layer=False)

    @classmethod
    def from_json(cls, path: str | dict[str, Any]) -> "BertTextEncoder":
        """From PIR's ``config_bert.json``, or its contents (as a checkpoint carries them)."""
        return cls(BertConfig.from_dict(read_text_config(path)))

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

    def remap_state(self, state: StateDict) -> Remapped:
        """Hugging Face, original-TF (``bert.``, ``gamma``/``beta``) or X-VLM names -> BertModel names. The MLM
        head and pooler are dropped, and so are X-VLM's cross-modal layers (those with ``crossattention``):
        a text-only encoder takes X-VLM's text layers only."""
        state = {remap_bert_key(k): v for k, v in state.items()}
        fusion = {k.split(".")[2] for k in state if k.startswith("encoder.layer.") and ".crossattention." in k}
        out, dropped = {}, []
        for key, value in state.items():
            if key.startswith(("cls.", "pooler.")):
                dropped.append(f"{key} (pre-training head)")
            elif key.startswith("encoder.layer.") and key.split(".")[2] in fusion:
                dropped.append(f"{key} (X-VLM cross-modal layer)")
            else:
                out[key] = value
        return Remapped(out, dropped=dropped)

    def load_pretrained(self, folder: str, allow_missing: Iterable[str] = ()) -> LoadReport:
        """Hugging Face BERT weights from a local folder (``model.safetensors`` or ``pytorch_model.bin``)."""
        if not Path(folder).is_dir():
            raise WeightsError(f"BERT folder not found: {folder} (text_encoder: a folder with vocab.txt, "
                               f"config.json and {' or '.join(WEIGHT_FILES)}; nothing is downloaded)")
        files = [Path(folder) / name for name in WEIGHT_FILES if (Path(folder) / name).is_file()]
        if not files:
            raise WeightsError(f"BERT folder {folder} has no weights ({' or '.join(WEIGHT_FILES)})")
        state = read_state_dict(files[0], "BERT weights")
        return load_into(self, self.remap_state(state), f"text encoder <- {files[0]}", allow_missing=allow_missing)


def read_text_config(path: str | dict[str, Any]) -> dict[str, Any]:
    """The BERT config JSON's contents (a dict is already its contents)."""
    if isinstance(path, dict):
        return dict(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"text_config JSON not found: {path}")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


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
