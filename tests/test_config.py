"""Config loading: YAML 1.2 numbers, PIR's keys as they are, overrides, and errors naming key and file."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import MINIMAL_CONFIG
from utils.config import ConfigError, config_reference, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = MINIMAL_CONFIG


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# PIR's configs/Retrieval_rsitmd.yaml, every key as it ships (compatibility.md §3.1).
PIR_YAML = """\
train_file: ['data/finetune/rsitmd_train.json']
val_file: 'data/finetune/rsitmd_val.json'
test_file: 'data/finetune/rsitmd_test.json'
image_root: '../X-VLM-pytorch/images/rsitmd/'
vision_config: 'configs/config_swinT_224.json'
resnet_ckpt: 'data/aid_28-rsp-resnet-50-ckpt.pth'
finetune_conv: False
use_swin: True
image_res: 224
patch_size: 32
text_config: 'configs/config_bert.json'
text_encoder: 'data/bert-base-uncased'
batch_size_train: 128
batch_size_test: 128
batch_size_test_text: 128
max_tokens: 47
embed_dim: 512
temp1: 0.07
temp2: 0.07
k_test: 512
is_baseline: False
optimizer: {opt: adamW, lr: 6e-5, weight_decay: 0.01, lr_mult: 2}
schedular: {sched: linear, lr: 6e-5, epochs: 50, num_warmup_steps: 0.1}
use_affil_loss: True
use_triplet_loss: False
center_factor: 1
# indistinct_margin: 0.01
filter_size: 40
instru_num: 2
cycle_num: 3
dropout_r: 0.2
head: 8
"""


def test_pir_config_loads_as_is(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, PIR_YAML))
    assert config["optimizer"]["lr"] == pytest.approx(6e-5) and isinstance(config["optimizer"]["lr"], float)
    assert config["schedular"]["epochs"] == 50
    assert config["train_file"] == ["data/finetune/rsitmd_train.json"]
    assert config["center_factor"] == 1.0 and config["k_test"] == 512
    assert config["model"] == "pir" and (config["filter_size"], config["instru_num"], config["cycle_num"]) == (40, 2, 3)


def test_yaml_12_floats_and_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert isinstance(config["optimizer"]["lr"], float)
    assert config["train_file"] == ["t.json"]  # a single string is accepted as a list
    assert config["model"] == "swin_bert_cl" and config["text_attention_mask"] is True
    assert config["optimizer"]["betas"] == [0.9, 0.98]


def test_overrides_are_parsed_as_yaml(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), ["optimizer.lr=1e-4", "schedular.epochs=3", "precision=amp_bf16",
                                                    "train_file=[a.json, b.json]", "scheduler.sched=cosine"])
    assert config["optimizer"]["lr"] == pytest.approx(1e-4)
    assert config["schedular"] == {"sched": "cosine", "lr": 6e-5, "epochs": 3, "num_warmup_steps": 0.1,
                                   "step_epochs": 20, "step_gamma": 0.7}
    assert config["train_file"] == ["a.json", "b.json"] and config["precision"] == "amp_bf16"


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "optimzer_typo: 1\n", "unknown key 'optimzer_typo' (did you mean 'optimizer'?)"),
    (MINIMAL + "batch_size_test: '64'\n", "key 'batch_size_test': expected int, got str"),
    (MINIMAL + "text_attention_mask: 1\n", "key 'text_attention_mask': expected bool, got int"),
    (MINIMAL + "precision: fp8\n", "key 'precision': 'fp8' is not one of"),
    (MINIMAL.replace("image_res: 224\n", ""), "missing required key 'image_res'"),
    (MINIMAL.replace("epochs: 20", "epoch: 20"), "unknown key 'schedular.epoch' (did you mean 'schedular.epochs'?)"),
    (MINIMAL.replace("lr: 6e-5, weight", "lr: fast, weight"), "key 'optimizer.lr': expected float, got str"),
    (MINIMAL + "scheduler: {epochs: 2}\n", "given twice"),
    ("- a\n- b\n", "the top level must be a mapping"),
])
def test_errors_name_the_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_bad_override_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"with command-line overrides\): unknown key 'optimizer.lrr'"):
        load_config(write(tmp_path, MINIMAL), ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(write(tmp_path, MINIMAL), ["optimizer.lr"])


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_dump_round_trips_and_safe_loader_refuses_objects(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, MINIMAL + "image_root: !!python/object/apply:os.system ['true']\n"))


def test_keys_of_another_model_round_trip_as_null_and_are_missing_where_required(tmp_path: Path) -> None:
    """PIR's required keys are null in a dual encoder's resolved config (a run's config.yaml, a checkpoint's
    config), which loads again; for PIR, null is as missing as absent."""
    config = load_config(write(tmp_path, MINIMAL))
    assert config["model"] == "swin_bert_cl" and config["filter_size"] is None
    assert load_config(write(tmp_path, dump_config(config))) == config
    pir = MINIMAL + "model: pir\nfilter_size: 40\ninstru_num: 2\ncycle_num: null\nhead: 8\n"
    with pytest.raises(ConfigError, match="missing required key 'cycle_num' .*, for model pir"):
        load_config(write(tmp_path, pir))
    with pytest.raises(ConfigError, match="missing required key 'optimizer.lr'"):
        load_config(write(tmp_path, MINIMAL.replace("lr: 6e-5, weight_decay", "lr: null, weight_decay")))


def test_legacy_aliases(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "temp: 0.05\nis_baseline: true\n"))
    assert config["temp1"] == pytest.approx(0.05) and config["model"] == "swin_bert_cl"


def test_environment_variables_in_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISVL_DATA", "/data/rs")
    config = load_config(write(tmp_path, MINIMAL.replace("image_root: images/", "image_root: ${FISVL_DATA}/img")))
    assert config["image_root"] == "/data/rs/img"


def test_reference_lists_every_key() -> None:
    table = config_reference()
    for key in ("`train_file`", "`optimizer.lr`", "`schedular.num_warmup_steps`", "`synthetic_data.root`"):
        assert key in table


def test_readme_config_reference_is_current() -> None:
    assert config_reference() in (ROOT / "README.md").read_text(encoding="utf-8")
