"""YAML configuration: YAML 1.2 safe loading, a schema with defaults, and errors that name the key.

The originals read YAML with ruamel's removed module-level API; PyYAML would read ``6e-5`` as a string.
Here every file goes through ``YAML(typ='safe')`` (YAML 1.2: ``6e-5`` is a float, no arbitrary objects),
then through :data:`SCHEMA`: unknown keys, wrong types and missing required keys are errors that name the
key and the file. PIR's ``Retrieval_rsitmd.yaml`` loads unchanged (flow mappings, the misspelled
``schedular``, its legacy keys).
"""
from __future__ import annotations

import difflib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

_REQUIRED = object()
RANDOM_INIT_PARTS = ("vision_encoder", "text_encoder", "conv_encoder")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Key:
    """One config key: accepted types, default (or required), allowed values and a one-line meaning."""

    types: tuple[type, ...]
    default: Any = _REQUIRED
    doc: str = ""
    choices: tuple[Any, ...] | None = None
    is_path: bool = False

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


Section = Mapping[str, "Key | Section"]

_SYNTHETIC_DATA: Section = {
    "root": Key((str,), ".cache/demo", "folder the procedural demo dataset is generated into", is_path=True),
    "train_per_class": Key((int,), 80, "train images per scene class"),
    "val_per_class": Key((int,), 10, "val images per scene class"),
    "test_per_class": Key((int,), 20, "test images per scene class"),
    "image_size": Key((int,), 64, "side of the generated PNGs in pixels"),
    "seed": Key((int,), 0, "generator seed"),
}

_OPTIMIZER: Section = {
    "opt": Key((str,), "adamW", "optimizer; only AdamW exists (X-VLM name kept)", choices=("adamW", "adamw")),
    "lr": Key((float,), doc="peak learning rate"),
    "weight_decay": Key((float,), 0.01, "AdamW weight decay (not applied to biases and norm weights)"),
    "lr_mult": Key((float,), 1.0, "learning-rate multiplier of the newly initialised heads (projections, temperature)"),
    "betas": Key((list,), [0.9, 0.98], "AdamW betas"),
    "eps": Key((float,), 1e-8, "AdamW epsilon"),
}

_SCHEDULER: Section = {
    "sched": Key((str,), "linear", "decay after warm-up", choices=("linear", "cosine")),
    "lr": Key((float,), None, "ignored, as in PIR/FISVL: the peak comes from optimizer.lr"),
    "epochs": Key((int,), doc="training length in epochs"),
    "num_warmup_steps": Key((int, float), 0.1, "warm-up length: a fraction (< 1) of all steps, or a step count"),
}

_CAPTION_WEIGHT: Section = {
    "rule": Key((str,), "short_low", "weight of a caption when the train JSON has no `length` field: short_low = "
                "`low` for captions shorter than avg_ratio x the mean word count, else 1; clip = "
                "clip(words / mean, low, 1); none = 1", choices=("short_low", "clip", "none")),
    "avg_ratio": Key((float,), 0.7, "short_low: fraction of the training split's mean word count"),
    "low": Key((float,), 0.95, "weight of short captions (short_low) or the lower clip bound (clip)"),
}

_IMAGE_DECODE: Section = {
    "scale": Key((str,), "depth", "how samples that are not uint8 become 0..255: depth = value / value_max; "
                 "percentile = each band's low/high percentile to 0/255; then clipped and rounded",
                 choices=("depth", "percentile")),
    "value_max": Key((float,), None, "depth: the value that becomes 255 (default: the integer dtype's maximum, "
                     "e.g. 65535 for uint16; 1 for floats)"),
    "percentiles": Key((list,), [2.0, 98.0], "percentile: [low, high] percentiles of each band (NaN ignored) that "
                       "become 0 and 255; a constant band becomes 0"),
    "bands": Key((list,), None, "1 or 3 band numbers, counted from 1, read as grey or RGB; default: band 1 of "
                 "1 or 2 bands (grey, grey + alpha) as grey, else bands 1, 2, 3"),
}

SCHEMA: Section = {
    # --- data
    "train_file": Key((list,), doc="train JSON file(s), one entry per caption; concatenated", is_path=True),
    "val_file": Key((str,), doc="val JSON, one entry per image with its captions", is_path=True),
    "test_file": Key((str,), doc="test JSON, one entry per image with its captions", is_path=True),
    "image_root": Key((str,), doc="folder joined to each entry's `image`", is_path=True),
    "image_decode": Key((dict,), {}, "how 16-bit, float and multi-band images become 8-bit RGB (see its keys)"),
    "synthetic_data": Key((dict,), None, "if set, generate the procedural demo dataset first (see its keys)"),
    "dataset_kind": Key((str,), "re", "train augmentation pipeline: re = crop + flip (X-VLM); re_rsitmd adds "
                        "RandAugment; re_rsicd/re_ucm/re_sydney add blur, RandAugment, erasing and GridMask",
                        choices=("re", "re_rsitmd", "re_rsicd", "re_ucm", "re_sydney")),
    "deletion_rate": Key((float,), 0.0, "train only: probability of deleting each caption word (FISVL)"),
    "caption_weight": Key((dict,), {},
                          "caption weights of the weighted contrastive loss, when the train JSON has no `length`"),
    "max_words": Key((int,), 30, "captions are cut to this many words by pre_caption"),
    "max_tokens": Key((int,), 40, "tokenizer max_length"),
    "skip_bad_samples": Key((bool,), False, "skip (count and log) missing/unreadable images instead of stopping"),
    "num_workers": Key((int,), 4, "data-loader worker processes per training process"),
    "pin_memory": Key((bool,), True, "pin host memory for faster GPU copies"),
    "persistent_workers": Key((bool,), True, "keep loader workers alive between epochs"),
    "check_images": Key((bool,), True, "decode every image of every split once before training or evaluation "
                        "starts (in parallel, num_workers processes), so a bad file stops the run at once"),
    # --- model
    "model": Key((str,), None, "registered model name (models.list_models()); when absent, fisvl for FISVL's "
                  "YAMLs (use_scene_loss: true), else swin_bert_cl"),
    "vision_config": Key((str,), doc="vision encoder JSON (arch, sizes, optional ckpt)", is_path=True),
    "text_config": Key((str,), doc="BERT config JSON", is_path=True),
    "text_encoder": Key((str,), doc="local folder with vocab.txt (and BERT weights for pretrained runs)", is_path=True),
    "use_swin": Key((bool,), True, "Swin (True) or ViT (False) when the vision JSON names no `arch`"),
    "image_res": Key((int,), doc="input resolution; must equal the vision JSON's image_res"),
    "patch_size": Key((int,), None, "total stride marker (Swin 32, ViT 16); checked when given"),
    "embed_dim": Key((int,), 256, "width of the joint embedding space"),
    "temp1": Key((float,), 0.07, "initial contrastive temperature (learnable)"),
    "temp": Key((float,), None, "X-VLM name of temp1"),
    "temp2": Key((float,), 0.07, "initial affiliation temperature (used by models with the affiliation loss)"),
    "text_attention_mask": Key((bool,), True, "pass BERT its attention mask (false reproduces PIR/FISVL)"),
    "is_baseline": Key((bool,), False, "PIR/FISVL switch for the plain Swin+BERT model (alias of model: swin_bert_cl)"),
    "grad_checkpointing": Key((bool,), False, "trade compute for memory in both encoders"),
    "fgis": Key((bool,), True, "FISVL: fuse CNN global/local tokens with the Swin tokens by graph reasoning"),
    "conv_arch": Key((str,), "resnet50", "FISVL/PIR prior CNN (torchvision layout)",
                     choices=("resnet18", "resnet34", "resnet50")),
    "resnet_ckpt": Key((str,), None, "prior CNN weights (FISVL/PIR; torchvision layout, e.g. RSP's ResNet-50)",
                       is_path=True),
    "allow_random_init": Key((list,), [], "encoders that may start from random weights when the config names "
                             "none: vision_encoder, text_encoder, conv_encoder (demos, tests); otherwise that is "
                             "an error"),
    "allow_missing_weights": Key((list,), [], "fnmatch patterns of model tensors that may keep their initial "
                                 "values when a checkpoint lacks them (e.g. 'sfgs.*'); any other missing tensor "
                                 "is an error"),
    "finetune_conv": Key((bool,), False, "train the prior CNN (FISVL/PIR keep it frozen)"),
    "conv_bn_train_mode": Key((bool,), True, "frozen CNN's BatchNorm in train mode, so batch statistics are used "
                              "and running statistics drift (as published); false = eval mode"),
    "sfgs": Key((str,), "frozen", "FISVL's SFGS token: frozen (as published: random and never trained), "
                "trainable, or off", choices=("frozen", "trainable", "off")),
    "img_gcn_step": Key((int,), 2, "FISVL: graph-reasoning steps over the image nodes"),
    "dropout_r": Key((float,), 0.2, "dropout of the fusion blocks (FISVL/PIR)"),
    # --- loss
    "soft_target_eps": Key((float,), 6e-5, "mass added to every target of the multi-positive contrastive loss"),
    "gather_with_grad": Key((bool,), True, "all-gather features with gradients flowing back to every process"),
    "local_loss": Key((bool,), True, "each process computes its own query rows against the gathered batch"),
    "stages": Key((list,), None, "value-guided stage schedule: a list of {name, start_epoch, losses: {contr, "
                  "affil, scene: weight}, caption_weights: bool}; default from the use_* keys"),
    "stage_patience": Key((int,), 0, "also move to the next stage after this many epochs without a better val "
                          "r_mean (0 = only at start_epoch)"),
    "affil_symmetric": Key((bool,), False, "affiliation loss: intended form (text vs image centres) instead of the "
                           "published transpose"),
    "affil_center_chunk": Key((int,), 0, "affiliation centres over chunks of this many rows of the global batch "
                              "(0 = each process's batch, as published)"),
    "scene_mode": Key((str,), "published", "scene-adaptive loss: published (no positive masking, integer "
                      "weights) or intended", choices=("published", "intended")),
    "alpha_m": Key((float,), None, "scene loss: softmax threshold on logits / temp (FISVL)"),
    "beta1": Key((float,), None, "scene loss: inter-scene weight exp(beta1 * epoch) (FISVL)"),
    "beta2": Key((float,), None, "scene loss: intra-scene weight exp(beta2 * epoch) (FISVL)"),
    # --- batch sizes
    "batch_size_train": Key((int,), doc="per-process train batch (global = x world size)"),
    "batch_size_test": Key((int,), 64, "image batch when embedding val/test"),
    "batch_size_test_text": Key((int,), 128, "text batch when embedding val/test"),
    # --- optimisation
    "optimizer": Key((dict,), doc="AdamW settings (see its keys)"),
    "schedular": Key((dict,), doc="warm-up + decay schedule (see its keys); `scheduler` is accepted too"),
    "precision": Key((str,), "fp32", "fp32, or autocast amp_bf16 / amp_fp16", choices=("fp32", "amp_bf16", "amp_fp16")),
    "grad_clip": Key((float,), 0.0, "clip the gradient norm to this value (0 = off)"),
    "nan_policy": Key((str,), "stop", "a step whose loss or gradient is NaN/inf: stop the run with a message naming "
                      "epoch, step and loss terms, or skip the update and count it", choices=("stop", "skip")),
    "nan_skip_limit": Key((int,), 10, "nan_policy skip: stop once more than this many steps of the run were skipped"),
    # --- evaluation, selection and logging
    "select_on": Key((str,), "val", "split whose r_mean picks checkpoint_best.pth", choices=("val", "test")),
    "eval_test_every_epoch": Key((bool,), True, "also evaluate test each epoch (logged, never used to select)"),
    "print_freq": Key((int,), 50, "console progress line every N iterations"),
    "legacy_log_footer": Key((bool,), False, "also append X-VLM's `best epoch: N` line to log.txt"),
    "k_test": Key((int,), None, "X-VLM re-rank depth; unused by dual encoders"),
    # --- PIR/FISVL keys accepted for compatibility; `stages` is derived from them when it is absent
    "use_affil_loss": Key((bool,), None, "add the affiliation loss (PIR/FISVL; derives `stages`)"),
    "center_factor": Key((float,), None, "affiliation loss weight (PIR/FISVL; derives `stages`)"),
    "use_scene_loss": Key((bool,), None, "FISVL's two stages: contr + affil + scene, then weighted contr + affil "
                          "from epoch 10 (derives `stages`)"),
    "scene_factor": Key((float,), None, "scene loss weight (FISVL; derives `stages`)"),
    "use_triplet_loss": Key((bool,), None, "VSE++ triplet loss (PIR); not implemented, only false is accepted"),
    "filter_size": Key((int,), None, "VIR top-k tokens (PIR)"),
    "instru_num": Key((int,), None, "Spatial-PAE depth (PIR)"),
    "cycle_num": Key((int,), None, "Temporal-PAE depth (PIR)"),
    "head": Key((int,), None, "attention heads of PAE (PIR)"),
}

_SECTIONS: dict[str, Section] = {"optimizer": _OPTIMIZER, "schedular": _SCHEDULER, "synthetic_data": _SYNTHETIC_DATA,
                                  "caption_weight": _CAPTION_WEIGHT, "image_decode": _IMAGE_DECODE}
_ALIASES = {"scheduler": "schedular"}


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean '<closest>'?)`` for an error message, or an empty string when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _check_value(value: Any, key: Key, where: str) -> Any:
    """Type-check one value (an int is a valid float, a bool is never a number); coerce str -> list for lists."""
    if value is None and not key.required and key.default is None:
        return None
    if list in key.types and isinstance(value, str):
        value = [value]
    if float in key.types and isinstance(value, int) and not isinstance(value, bool):
        value = value if int in key.types else float(value)
    ok = isinstance(value, key.types) and not (isinstance(value, bool) and bool not in key.types)
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(key.types)}, got {type(value).__name__} {value!r}")
    if key.choices is not None and value not in key.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(key.choices)}")
    if key.is_path and value is not None:
        expand = lambda p: os.path.expanduser(os.path.expandvars(p))  # noqa: E731
        value = [expand(p) for p in value] if isinstance(value, list) else expand(value)
    return value


def _validate(raw: Mapping[str, Any], schema: Section, source: str, prefix: str = "") -> dict[str, Any]:
    """Return ``raw`` checked against ``schema`` with defaults filled in; nested sections recursively."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        name = _ALIASES.get(name, name) if not prefix else name
        where = f"{source}: key '{prefix}{name}'"
        if not isinstance(name, str) or name not in schema:
            raise ConfigError(f"{source}: unknown key '{prefix}{name}'{did_you_mean(str(name), schema, prefix)}")
        if name in out:
            raise ConfigError(f"{where} is given twice (once under an alias)")
        key = schema[name]
        section = _SECTIONS.get(prefix + name) if isinstance(key, Key) else None
        if section is not None and value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
            value = _validate(value, section, source, prefix=f"{prefix}{name}.")
        out[name] = _check_value(value, key, where)
    for name, key in schema.items():
        if name in out:
            continue
        if key.required:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}' ({key.doc})")
        section = _SECTIONS.get(prefix + name)
        out[name] = _validate({}, section, source, f"{prefix}{name}.") if section and key.default == {} else key.default
    return out


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    return yaml


def _parse_scalar(text: str) -> Any:
    """Parse an override value as YAML 1.2 (``1e-4`` -> float, ``[a, b]`` -> list, ``true`` -> bool)."""
    return _yaml().load(text) if text.strip() else ""


def _list_index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"command-line override '{item}': '{part}' is not an index of a {len(node)}-item list")
    return int(part)


def _child(node: Any, part: str, item: str) -> Any:
    """Step into a section (created when absent) or a list item (``stages.1.start_epoch``)."""
    if isinstance(node, list):
        return node[_list_index(node, part, item)]
    child = node.get(part)
    if child is None:
        child = node[part] = {}
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"command-line override '{item}': '{part}' is not a section")
    return child


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a raw (unvalidated) config dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}': expected key=value (e.g. optimizer.lr=1e-4)")
        dotted, text = item.split("=", 1)
        parts = [_ALIASES.get(p, p) if i == 0 else p for i, p in enumerate(dotted.strip().split("."))]
        node: Any = raw
        for part in parts[:-1]:
            node = _child(node, part, item)
        last: Any = parts[-1]
        if isinstance(node, list):
            last = _list_index(node, last, item)
        try:
            node[last] = _parse_scalar(text)
        except YAMLError as err:
            raise ConfigError(f"command-line override '{item}': cannot parse the value: {err}") from err
    return raw


def _legacy_aliases(config: dict[str, Any]) -> None:
    """Fold legacy spellings into their canonical keys."""
    if config["temp"] is not None:
        config["temp1"] = config["temp"]
    if config["is_baseline"]:
        config["model"] = "swin_bert_cl"
    if config["model"] is None:
        config["model"] = "fisvl" if config["use_scene_loss"] else "swin_bert_cl"
    if config["use_triplet_loss"]:
        raise ConfigError("use_triplet_loss: true is not supported (PIR's VSE++ triplet variant); set it to false")


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a YAML 1.2 config, apply ``key.sub=value`` overrides, validate it and fill in defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = _yaml().load(path.read_text(encoding="utf-8"))
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    overrides = list(overrides)
    raw = apply_overrides(dict(raw), overrides)
    source = f"{path}" + (" (with command-line overrides)" if overrides else "")
    config = _validate(raw, SCHEMA, source)
    _legacy_aliases(config)
    unknown = [part for part in config["allow_random_init"] if part not in RANDOM_INIT_PARTS]
    if unknown:
        raise ConfigError(f"{source}: allow_random_init names {unknown}; the encoders are "
                          f"{', '.join(RANDOM_INIT_PARTS)}")
    return config


def dump_config(config: Mapping[str, Any]) -> str:
    """The config as YAML text (block style), loadable again by :func:`load_config`."""
    stream = io.StringIO()
    _yaml().dump(_plain(config), stream)
    return stream.getvalue()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_reference() -> str:
    """Markdown table of every key, its type, default and meaning (the README's config reference)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def add(schema: Section, prefix: str) -> None:
        for name, key in schema.items():
            default = "required" if key.required else f"`{key.default!r}`"
            choices = f" One of {', '.join(map(str, key.choices))}." if key.choices else ""
            rows.append(f"| `{prefix}{name}` | {_type_name(key.types)} | {default} | {key.doc}.{choices} |")
            if prefix + name in _SECTIONS:
                add(_SECTIONS[prefix + name], f"{prefix}{name}.")

    add(SCHEMA, "")
    return "\n".join(rows) + "\n"
