"""YAML configuration: YAML 1.2 safe loading, a schema with defaults, and errors that name the key.

The originals read YAML with ruamel's removed module-level API; PyYAML would read ``6e-5`` as a string.
Here every file goes through ``YAML(typ='safe')`` (YAML 1.2: ``6e-5`` is a float, no arbitrary objects),
then through :func:`schema`: unknown keys, wrong types and missing required keys are errors that name the
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
_MISSING = object()  # a required key the file does not give; an error only where its group applies


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


Section = Mapping[str, Key]

_SYNTHETIC_DATA: Section = {
    "root": Key((str,), ".cache/demo", "folder the procedural demo dataset is generated into", is_path=True),
    "train_per_class": Key((int,), 80, "train images per scene class"),
    "val_per_class": Key((int,), 10, "val images per scene class"),
    "test_per_class": Key((int,), 20, "test images per scene class"),
    "image_size": Key((int,), 64, "side of the generated PNGs in pixels"),
    "seed": Key((int,), 0, "generator seed"),
}

_OPTIMIZER: Section = {
    "opt": Key((str,), "adamW", "optimizer: adamW (X-VLM lineage; decoupled weight decay) or adam (AMFMN lineage; "
                "weight_decay is then an L2 term)", choices=("adamW", "adamw", "adam")),
    "lr": Key((float,), doc="peak learning rate"),
    "weight_decay": Key((float,), 0.01, "AdamW weight decay (not applied to biases and norm weights)"),
    "lr_mult": Key((float,), 1.0, "learning-rate multiplier of the newly initialised heads (projections, temperature)"),
    "betas": Key((list,), [0.9, 0.98], "AdamW betas"),
    "eps": Key((float,), 1e-8, "AdamW epsilon"),
    "fused": Key((bool,), False, "torch's fused AdamW/Adam kernel (the same update in one kernel over all "
                 "parameters; CUDA, and CPU in recent torch); an error names this key on a device without it"),
}

_SCHEDULER: Section = {
    "sched": Key((str,), "linear", "decay after warm-up: linear or cosine to 0, or step (x step_gamma every "
                  "step_epochs epochs, AMFMN's)", choices=("linear", "cosine", "step")),
    "step_epochs": Key((int,), 20, "step schedule: epochs between decays (AMFMN: 20)"),
    "step_gamma": Key((float,), 0.7, "step schedule: factor of each decay (AMFMN: 0.7)"),
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

_DATA: Section = {
    "train_file": Key((list,), doc="train JSON file(s), one entry per caption; concatenated", is_path=True),
    "val_file": Key((str,), doc="val JSON, one entry per image with its captions", is_path=True),
    "test_file": Key((str,), doc="test JSON, one entry per image with its captions", is_path=True),
    "image_root": Key((str,), doc="folder joined to each entry's `image`", is_path=True),
    "mask_root": Key((str,), None, "folder of the segmentation masks (RSITMD-SS: `mask_<image stem>.png`, value = "
                     "10 x class index, 255 = ignore; an entry's `mask` field names its file instead); every image "
                     "then needs one, and evaluation gets them; null = no masks", is_path=True),
    "image_decode": Key((dict,), {}, "how 16-bit, float and multi-band images become 8-bit RGB (see its keys)"),
    "synthetic_data": Key((dict,), None, "if set, generate the procedural demo dataset first (see its keys)"),
    "dataset_kind": Key((str,), "re", "train augmentation pipeline: re = crop + flip (X-VLM); re_rsitmd adds "
                        "RandAugment; re_rsicd/re_ucm/re_sydney add blur, RandAugment, erasing and GridMask",
                        choices=("re", "re_rsitmd", "re_rsicd", "re_ucm", "re_sydney")),
    "image_res": Key((int,), doc="input resolution of the image transforms"),
    "deletion_rate": Key((float,), 0.0, "train only: probability of deleting each caption word (FISVL)"),
    "caption_weight": Key((dict,), {},
                          "caption weights of the weighted contrastive loss, when the train JSON has no `length`"),
    "max_words": Key((int,), 30, "captions are cut to this many words by pre_caption"),
    "max_tokens": Key((int,), 40, "tokenizer max_length"),
    "skip_bad_samples": Key((bool,), False, "skip (count and log) missing/unreadable images instead of stopping"),
    "check_images": Key((bool,), True, "decode every image of every split once before training or evaluation "
                        "starts (in parallel, num_workers processes), so a bad file stops the run at once"),
    "num_workers": Key((int,), 4, "data-loader worker processes per training process"),
    "pin_memory": Key((bool,), True, "pin host memory for faster GPU copies"),
    "persistent_workers": Key((bool,), True, "keep loader workers alive between epochs"),
}

_MODEL: Section = {
    "model": Key((str,), None, "registered model name (models.list_models()); when absent, fisvl for FISVL's "
                  "YAMLs (use_scene_loss: true), pir for PIR's (filter_size given, is_baseline: false), else "
                  "swin_bert_cl"),
    "embed_dim": Key((int,), 256, "width of the joint embedding space"),
    "allow_random_init": Key((list,), [], "encoders that may start from random weights when the config names "
                             "none (demos, tests; the model's encoders, e.g. vision_encoder, text_encoder, "
                             "conv_encoder); otherwise that is an error"),
    "allow_missing_weights": Key((list,), [], "fnmatch patterns of model tensors that may keep their initial "
                                 "values when a checkpoint lacks them (e.g. 'sfgs.*'); any other missing tensor "
                                 "is an error"),
    "grad_checkpointing": Key((bool,), False, "trade compute for memory in the encoders"),
}

_OPTIMISATION: Section = {
    "batch_size_train": Key((int,), doc="per-process train batch (global = x world size)"),
    "batch_size_test": Key((int,), 64, "image batch when embedding val/test"),
    "batch_size_test_text": Key((int,), 128, "text batch when embedding val/test"),
    "optimizer": Key((dict,), doc="AdamW settings (see its keys)"),
    "schedular": Key((dict,), doc="warm-up + decay schedule (see its keys); `scheduler` is accepted too"),
    "precision": Key((str,), "fp32", "fp32, or autocast amp_bf16 / amp_fp16", choices=("fp32", "amp_bf16", "amp_fp16")),
    "grad_clip": Key((float,), 0.0, "clip the gradient norm to this value (0 = off)"),
    "nan_policy": Key((str,), "stop", "a step whose loss or gradient is NaN/inf: stop the run with a message naming "
                      "epoch, step and loss terms, or skip the update and count it", choices=("stop", "skip")),
    "nan_skip_limit": Key((int,), 10, "nan_policy skip: stop once more than this many steps of the run were skipped"),
}

_STAGES: Section = {
    "stages": Key((list,), None, "value-guided stage schedule: a list of {name, start_epoch, losses: {<registered "
                  "loss>: weight}, caption_weights: bool}; default from the use_* keys"),
    "stage_patience": Key((int,), 0, "also move to the next stage after this many epochs without a better val "
                          "r_mean (0 = only at start_epoch)"),
    "use_affil_loss": Key((bool,), None, "add the affiliation loss (PIR/FISVL; derives `stages`)"),
    "center_factor": Key((float,), None, "affiliation loss weight (PIR/FISVL; derives `stages`)"),
    "use_scene_loss": Key((bool,), None, "FISVL's two stages: contr + affil + scene, then weighted contr + affil "
                          "from epoch 10 (derives `stages`)"),
    "scene_factor": Key((float,), None, "scene loss weight (FISVL; derives `stages`)"),
    "use_triplet_loss": Key((bool,), None, "PIR's VSE++ triplet loss instead of every other loss (derives `stages`)"),
}

_EVALUATION: Section = {
    "select_on": Key((str,), "val", "split whose r_mean picks checkpoint_best.pth", choices=("val", "test")),
    "eval_test_every_epoch": Key((bool,), True, "also evaluate test each epoch (logged, never used to select)"),
    "protocol": Key((str,), "select_on_val", "what the run reports: select_on_val = test at the checkpoint chosen "
                    "by select_on; mean_of_last_epochs_on_test = also SIRS's paper protocol, the mean of test over "
                    "the last protocol_last_epochs epochs (evaluated on test whatever eval_test_every_epoch says), "
                    "labelled as not a model selection; checkpoints are still chosen by select_on",
                    choices=("select_on_val", "mean_of_last_epochs_on_test")),
    "protocol_last_epochs": Key((int,), 10, "mean_of_last_epochs_on_test: how many final epochs are averaged "
                                "(SIRS: last_num_epochs_val, 10 of 35); 1..schedular.epochs"),
    "figures": Key((bool,), True, "write PNG figures to output_dir/figures/: training curves each epoch, and for the "
                   "test split at each newly selected epoch and with --evaluate, recall@K curves (K = 1..50) and "
                   "qualitative sheets (top images per caption, top captions per image)"),
    "figure_queries": Key((int,), 6, "captions and images sampled (evenly, the same in every run) for the "
                          "qualitative sheets"),
    "print_freq": Key((int,), 50, "console progress line every N iterations"),
    "legacy_log_footer": Key((bool,), False, "also append X-VLM's `best epoch: N` line to log.txt"),
}


@dataclass(frozen=True)
class KeyGroup:
    """Config keys declared together, by the module that reads them. ``models``: the models whose configs
    must give the group's required keys (``None``: every model)."""

    title: str
    keys: Section
    models: tuple[str, ...] | None = None


_GROUPS: dict[str, KeyGroup] = {}


def register_keys(title: str, keys: Section, models: tuple[str, ...] | None = None) -> None:
    """Declare config keys beside the code that reads them (a model, a loss); YAMLs stay flat, so a key
    name may belong to one group only."""
    clash = sorted(set(keys) & set(schema()))
    if clash:
        raise ValueError(f"config keys {clash} of '{title}' are already declared by another group")
    _GROUPS[title] = KeyGroup(title, keys, models)


def schema() -> dict[str, Key]:
    """Every declared top-level key (the core groups, and those the imported models and losses declared)."""
    return {name: key for group in _GROUPS.values() for name, key in group.keys.items()}


for _title, _keys in (("Data", _DATA), ("Model (every model)", _MODEL), ("Optimisation", _OPTIMISATION),
                      ("Loss stages", _STAGES), ("Evaluation and logging", _EVALUATION)):
    register_keys(_title, _keys)

_SECTIONS: dict[str, Section] = {"optimizer": _OPTIMIZER, "schedular": _SCHEDULER, "synthetic_data": _SYNTHETIC_DATA,
                                  "caption_weight": _CAPTION_WEIGHT, "image_decode": _IMAGE_DECODE}
_ALIASES = {"scheduler": "schedular"}


def did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean '<closest>'?)`` for an error message, or an empty string when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _unregistered_hint(prefix: str) -> str:
    """Models and losses declare their keys when ``models`` is imported; say so when none has."""
    if prefix or any(group.models is not None for group in _GROUPS.values()):
        return ""
    return " (no model has declared its keys: import models before loading a config)"


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _check_value(value: Any, key: Key, where: str) -> Any:
    """Type-check one value (an int is a valid float, a bool is never a number); coerce str -> list for lists.
    A required key may be null: a config written for a model that does not use it holds it so (the required
    check then decides)."""
    if value is None and (key.required or key.default is None):
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
        expand = lambda p: os.path.expanduser(os.path.expandvars(p)) if isinstance(p, str) else p  # noqa: E731
        value = [expand(p) for p in value] if isinstance(value, list) else expand(value)
    return value


def _validate(raw: Mapping[str, Any], schema: Section, source: str, prefix: str = "") -> dict[str, Any]:
    """Return ``raw`` checked against ``schema`` with defaults filled in; nested sections recursively."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        name = _ALIASES.get(name, name) if not prefix else name
        where = f"{source}: key '{prefix}{name}'"
        if not isinstance(name, str) or name not in schema:
            hint = did_you_mean(str(name), schema, prefix) or _unregistered_hint(prefix)
            raise ConfigError(f"{source}: unknown key '{prefix}{name}'{hint}")
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
            out[name] = _MISSING
            continue
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


def _check_required(config: dict[str, Any], source: str) -> None:
    """A required key is an error to leave out (or leave null) when its group applies to the config's model;
    otherwise it is ``None``. Nested sections (``optimizer.lr``) belong to core groups and always apply."""
    for group in _GROUPS.values():
        applies = group.models is None or config["model"] in group.models
        for name, key in group.keys.items():
            if key.required and config.get(name) in (_MISSING, None):
                if applies:
                    models = f", for model {config['model']}" if group.models else ""
                    raise ConfigError(f"{source}: missing required key '{name}' ({key.doc}{models})")
                config[name] = None
            section = _SECTIONS.get(name)
            if section is not None and isinstance(config.get(name), dict):
                for sub, value in config[name].items():
                    if section[sub].required and value in (_MISSING, None):
                        raise ConfigError(f"{source}: missing required key '{name}.{sub}' ({section[sub].doc})")


def _legacy_aliases(config: dict[str, Any]) -> None:
    """Fold legacy spellings into their canonical keys."""
    if config["temp"] is not None:
        config["temp1"] = config["temp"]
    if config["is_baseline"]:
        config["model"] = "swin_bert_cl"
    if config["model"] is None:
        pir_keys = config.get("filter_size") not in (None, _MISSING)
        config["model"] = "fisvl" if config["use_scene_loss"] else "pir" if pir_keys else "swin_bert_cl"


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
    return config_from_dict(raw, source)


def config_from_dict(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate a config given as a mapping (a checkpoint's ``config``): unknown keys and wrong types are
    errors naming ``source``; defaults are filled in, so a config written before a key existed still loads."""
    config = _validate(raw, schema(), source)
    _legacy_aliases(config)
    _check_required(config, source)
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
    """Markdown tables of every key, its type, default and meaning, one per group of keys (the README's
    config reference)."""
    out: list[str] = []

    def add(rows: list[str], section: Section, prefix: str) -> None:
        for name, key in section.items():
            default = "required" if key.required else f"`{key.default!r}`"
            choices = f" One of {', '.join(map(str, key.choices))}." if key.choices else ""
            rows.append(f"| `{prefix}{name}` | {_type_name(key.types)} | {default} | {key.doc}.{choices} |")
            if prefix + name in _SECTIONS:
                add(rows, _SECTIONS[prefix + name], f"{prefix}{name}.")

    for group in _GROUPS.values():
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        add(rows, group.keys, "")
        models = f" (required keys apply to: {', '.join(group.models)})" if group.models else ""
        out.append(f"**{group.title}**{models}\n\n" + "\n".join(rows) + "\n")
    return "\n".join(out)
