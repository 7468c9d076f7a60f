"""AMFMN and GaLR-global (baselines.md §3-4): word vocabulary, bi-GRU, MVSA, the visual-guided text
attentions, pairwise scoring in evaluation, released checkpoint names, Adam and the step schedule."""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import SHARED_DATASETS, word_model_config, write_json
from test_skipthoughts import theano_params, write_original
from dataset.annotations import TrainAnnotations
from dataset.captions import ENGLISH_STOP_WORDS, word_tokens
from dataset.text_similarity import prior_text_similarity
from models import build_model
from models.amfmn import pairwise_cosine
from models.encoders.gru import BiGRUTextEncoder
from models.encoders.resnet import ResNetEncoder
from models.fusion import MVSA, VisualGuidedText
from models.inference import similarity_matrix
from models.loading import load_for_evaluation
from models.losses import PRIOR_SIMILARITY_FILE, LossInputs, TripletLoss, adaptive_margin, triplet_loss
from models.objective import build_objective
from models.task import RetrievalTask
from models.text import VocabularyError, WordVocabProcessor
from optim import create_optimizer
from scheduler import create_scheduler, parse_stages
from utils.config import load_config
from utils.metrics import chance_metrics
from utils.weights import with_prefix

ROOT = Path(__file__).resolve().parents[1]
RSITMD_VOCAB = SHARED_DATASETS / "RSITMD" / "vocab" / "rsitmd_splits_vocab.json"


def amfmn_config(tmp_path: Path, *overrides: str) -> dict:
    return word_model_config(tmp_path, "amfmn", *overrides)


# --- words


def test_word_tokens_split_sentence_periods_and_keep_abbreviations() -> None:
    assert word_tokens("Some buildings. A plane's wing, near 2 cars .") == [
        "Some", "buildings", ".", "A", "plane", "'s", "wing", ",", "near", "2", "cars", "."]
    assert word_tokens("the u.s. flag") == ["the", "u.s.", "flag"]
    assert len(ENGLISH_STOP_WORDS) == 179 and {"the", "is", "there", "wouldn't"} <= ENGLISH_STOP_WORDS


def test_vocabulary_built_as_amfmn_builds_it() -> None:
    """Stop words and punctuation never enter; words below the count are left out; first-appearance order;
    <unk> last; id 0 pads."""
    captions = ["A red plane, a red car.", "the red plane is big", "Planes: one car; red"]
    processor = WordVocabProcessor.from_captions(captions, min_count=2)
    assert processor.words == ["<pad>", "red", "plane", "car", "<unk>"]
    out = processor(["red planes near a car", "plane"])
    assert out["input_ids"].tolist() == [[1, 4, 4, 4, 3], [2, 0, 0, 0, 0]]
    assert out["lengths"].tolist() == [5, 1]
    with pytest.raises(VocabularyError, match="no word occurs 9 times"):
        WordVocabProcessor.from_captions(captions, min_count=9)
    with pytest.raises(ValueError, match="no word tokens"):
        processor(["red", " , . "])


@pytest.mark.skipif(not RSITMD_VOCAB.is_file(), reason="../shared/datasets is not available")
def test_released_rsitmd_vocabulary_loads() -> None:
    processor = WordVocabProcessor.from_vocab_file(RSITMD_VOCAB)
    word2idx = json.loads(RSITMD_VOCAB.read_text())["word2idx"]
    assert processor.vocab_size == len(word2idx) + 1 == 1350
    ids = processor(["A white plane parked beside the runway"])["input_ids"][0].tolist()
    unk = word2idx["<unk>"]
    assert ids == [unk, word2idx["white"], word2idx["plane"], word2idx["parked"], word2idx["beside"], unk,
                   word2idx["runway"]]  # stop words are <unk>: the released vocabulary leaves them out
    assert WordVocabProcessor.from_state(processor.state()).words == processor.words


def test_vocabulary_file_errors_name_the_file(tmp_path: Path) -> None:
    cases = {"not_json.json": "{", "no_word2idx.json": json.dumps({"idx": 3}),
             "gaps.json": json.dumps({"word2idx": {"a": 1, "<unk>": 3}})}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(VocabularyError, match=name):
            WordVocabProcessor.from_vocab_file(tmp_path / name)
    write_json(tmp_path / "no_unk.json", {"word2idx": {"a": 1, "b": 2}})
    with pytest.raises(VocabularyError, match="no_unk.json.*<unk>"):
        WordVocabProcessor.from_vocab_file(tmp_path / "no_unk.json")


# --- text encoder


def test_bigru_averages_directions_then_words_and_ignores_padding() -> None:
    torch.manual_seed(0)
    encoder = BiGRUTextEncoder(vocab_size=20, word_dim=6, width=5).eval()
    caption = torch.tensor([3, 7, 2])
    alone = encoder(caption[None], torch.tensor([3]))
    batch = torch.tensor([[3, 7, 2, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    assert torch.allclose(encoder(batch, torch.tensor([3, 6]))[0], alone[0], atol=1e-6)
    # the formula, from the GRU run forward and backward over the caption alone
    states, _ = encoder.gru(encoder.embedding(caption)[None])
    expected = ((states[0, :, :5] + states[0, :, 5:]) / 2).mean(0)
    assert torch.allclose(alone[0], expected, atol=1e-6)


# --- image branch


def test_mvsa_at_paper_size_follows_the_released_forward() -> None:
    """ResNet-18 at 256 px: stages 64x64x64, 128x32x32, 256x16x16, 512x8x8; MVSA meets at 16x16 (256 values)."""
    torch.manual_seed(0)
    backbone = ResNetEncoder("resnet18").eval()
    stages = backbone.forward_stages(torch.randn(2, 3, 256, 256))
    assert [tuple(s.shape[1:]) for s in stages] == [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8)]
    mvsa = MVSA(backbone.stage_channels, 256, 512)
    global_vector = torch.randn(2, 512)
    out = mvsa(stages, global_vector)
    assert out.shape == (2, 512)
    # the spec step by step
    f1, f2, f3, f4 = stages
    low = F.conv2d(torch.cat([f1, f2.repeat_interleave(2, 2).repeat_interleave(2, 3)], 1), mvsa.LF_conv.weight,
                   mvsa.LF_conv.bias, stride=4)
    high = F.conv2d(torch.cat([f3, f4.repeat_interleave(2, 2).repeat_interleave(2, 3)], 1), mvsa.HF_conv.weight,
                    mvsa.HF_conv.bias)
    assert low.shape == high.shape == (2, 3, 16, 16)
    joint = torch.cat([low, high], 1) + high.mean(1, keepdim=True)
    main = F.conv2d(joint, mvsa.conv1x1_1.weight, mvsa.conv1x1_1.bias)
    gate = torch.sigmoid(F.conv2d(joint, mvsa.conv1x1_2.weight, mvsa.conv1x1_2.bias))
    mask = torch.sigmoid((main * gate).reshape(2, 256) @ mvsa.solo_attention.weight.T + mvsa.solo_attention.bias)
    assert torch.allclose(out, global_vector * mask, atol=1e-5)


def test_resnet_transforms_crop_rotate_and_normalise_as_amfmn(tmp_path: Path) -> None:
    config = amfmn_config(tmp_path, "image_res=256", "resize_res=278")
    model = build_model(config, pretrained=False)
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    assert model.train_transform(image).shape == model.eval_transform(image).shape == (3, 256, 256)
    rotation = [t for t in model.train_transform.transforms if type(t).__name__ == "RandomRotation"]
    assert rotation and list(rotation[0].degrees) == [0.0, 90.0]
    red = model.eval_transform(image)[:, 128, 128]
    assert torch.allclose(red, (torch.tensor([1.0, 0, 0]) - torch.tensor([0.485, 0.456, 0.406]))
                          / torch.tensor([0.229, 0.224, 0.225]), atol=1e-5)


# --- scores


def guided_reference(head: VisualGuidedText, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Each pair by its formula (baselines.md §3.3), one pair at a time, then AMFMN's cosine."""
    scores = torch.empty(v.shape[0], t.shape[0])
    for i in range(v.shape[0]):
        for j in range(t.shape[0]):
            if head.kind == "soft_att":
                guided = torch.sigmoid(head.cross_attention[0](v[i])) * t[j]
            elif head.kind == "fusion_att":
                joint = torch.cat([v[i], t[j]])
                guided = torch.sigmoid(head.cross_attention_fc1[0](joint)) * head.cross_attention_fc2[0](joint)
            else:
                mapped = head.fc_text[0](t[j])
                guided = torch.sigmoid(head.fc_visual[0](v[i]) * mapped) * mapped
            scores[i, j] = (v[i] @ guided) / (v[i].norm() * guided.norm()).clamp(min=1e-8)
    return scores


@pytest.mark.parametrize("kind", ["soft_att", "fusion_att", "similarity_att"])
def test_guided_attentions_match_their_formulas(kind: str) -> None:
    torch.manual_seed(1)
    head = VisualGuidedText(kind, 8)
    v, t = torch.randn(3, 8), torch.randn(5, 8)
    guided = head(v, t)
    assert guided.shape == (3, 5, 8)
    assert torch.allclose(pairwise_cosine(v, guided), guided_reference(head, v, t), atol=1e-6)


@pytest.mark.parametrize("model_name", ["amfmn", "galr_global"])
def test_blockwise_evaluation_equals_one_block(model_name: str, tmp_path: Path) -> None:
    config = amfmn_config(tmp_path, f"model={model_name}", "att_type=fusion_att")
    model = build_model(config, pretrained=False).eval()
    images = model.encode_image(torch.randn(7, 3, 64, 64))
    texts = model.encode_text(model.text_processor([f"{n} white plane beside runway" for n in range(11)]))
    whole = model.similarity(images, texts)
    model.similarity_chunks = (3, 4)  # blocks of 3 images x 4 captions, ragged at both edges
    assert torch.allclose(similarity_matrix(model, images, texts), whole, atol=1e-6)
    if model_name == "galr_global":
        assert torch.allclose(whole, F.cosine_similarity(images[:, None], texts[None], dim=-1), atol=1e-6)


def test_pairwise_model_refuses_losses_that_use_dot_products(tmp_path: Path) -> None:
    config = amfmn_config(tmp_path, "stages=[{name: c, start_epoch: 0, losses: {contr: 1}}]")
    with pytest.raises(ValueError, match=r"\['contr'\] score pairs by dot products.*triplet"):
        RetrievalTask(build_model(config, pretrained=False), build_objective(config, parse_stages(config)))


def test_training_step_scores_the_batch_with_the_guided_head(tmp_path: Path) -> None:
    """The triplet loss of a training step is the formula on the model's pairwise scores."""
    config = amfmn_config(tmp_path)
    model = build_model(config, pretrained=False)
    task = RetrievalTask(model, build_objective(config, parse_stages(config))).eval()
    images = torch.randn(4, 3, 64, 64)
    text = model.text_processor(["white plane", "red roof", "cars beside road", "white planes near runway"])
    ids = torch.tensor([0, 1, 2, 0])
    loss = task({"images": images, "text": text, "image_idx": ids}, epoch=0)["loss_triplet"]
    scores = model.similarity(model.encode_image(images), model.encode_text(text))
    negative = ids[:, None] != ids[None, :]
    expected = (((0.2 + scores - scores.diag()[:, None]).clamp(min=0) * negative).sum()
                + ((0.2 + scores - scores.diag()[None, :]).clamp(min=0) * negative).sum())
    assert torch.allclose(loss, expected, atol=1e-5)
    assert {name.split(".")[0] for name, p in model.named_parameters()} >= {"guided_text", "mvsa", "text_encoder"}


# --- weights


def released_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in AMFMN's released layout, written from this model's: names of AMFMN.py."""
    renames = {"image_encoder.": "extract_feature.resnet.", "global_proj.": "extract_feature.linear.",
               "mvsa.": "mvsa.", "guided_text.": "cross_attention_s.", "text_encoder.": "text_feature.seq2vec."}
    state = {k: v for k, v in state.items() if k.startswith(tuple(renames))}
    out = {}
    for key, value in state.items():
        prefix = next(p for p in renames if key.startswith(p))
        out[renames[prefix] + key[len(prefix):]] = value
    out["extract_feature.resnet.fc.weight"] = torch.zeros(1000, 512)
    out["extract_feature.resnet.fc.bias"] = torch.zeros(1000)
    out["vgmf_gate.gate.weight"] = torch.zeros(128, 256)
    return out


def test_released_layout_checkpoint_loads_completely(tmp_path: Path) -> None:
    config = amfmn_config(tmp_path, "att_type=similarity_att")
    torch.manual_seed(2)
    trained = build_model(config, pretrained=False)
    path = tmp_path / "amfmn_rsitmd_best.pth.tar"
    torch.save({"model": released_names(trained.state_dict()), "epoch": 12}, path)
    torch.manual_seed(3)
    fresh = build_model(config, pretrained=False)
    report = load_for_evaluation(fresh, str(path), config)
    assert report.loaded == len(trained.state_dict()) and not report.missing
    assert any("vgmf_gate" in entry for entry in report.unexpected)
    assert any("fc.weight" in entry for entry in report.unexpected)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_imagenet_resnet18_file_loads_into_the_image_encoder(tmp_path: Path) -> None:
    """A torchvision-layout ResNet-18 file (its classifier dropped) via image_ckpt; without one the encoder
    must be allowed to start at random."""
    from torchvision.models import resnet18

    torch.manual_seed(4)
    reference = resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    config = amfmn_config(tmp_path, f"image_ckpt={tmp_path / 'resnet18.pth'}", "allow_random_init=[]")
    model = build_model(config)
    assert torch.equal(model.image_encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(Exception, match="image_encoder: image_ckpt is not set"):
        build_model(amfmn_config(tmp_path, "allow_random_init=[]"))


def test_paper_size_parameter_count(tmp_path: Path) -> None:
    """ResNet-18 (no classifier) + global Linear + MVSA + bi-GRU over a 1,350-entry vocabulary + soft attention."""
    vocab = write_json(tmp_path / "vocab.json", {"word2idx": {**{f"w{i}": i + 1 for i in range(1348)}, "<unk>": 1349}})
    config = load_config(ROOT / "configs" / "Retrieval_rsitmd_amfmn.yaml", [f"vocab_file={vocab}"])
    model = build_model(config, pretrained=False)
    d, c = 512, 3
    resnet18 = 11_689_512 - (512 * 1000 + 1000)
    mvsa = (192 * c * 9 + c) + (768 * c + c) + 2 * (2 * c + 1) + (256 * d + d)
    gru = 1350 * 300 + 2 * 3 * (300 * d + d * d + 2 * d)
    expected = resnet18 + (512 * d + d) + mvsa + gru + (d * d + d)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.text_processor.vocab_size == 1350


# --- optimisation


def test_adam_and_the_step_schedule(tmp_path: Path) -> None:
    """AMFMN: Adam, lr x 0.7 after every 20 epochs (constant within an epoch)."""
    config = amfmn_config(tmp_path, "optimizer.lr=2e-4", "schedular.step_epochs=20", "schedular.epochs=70")
    model = build_model(config, pretrained=False)
    optimizer = create_optimizer(config["optimizer"], model)
    assert type(optimizer) is torch.optim.Adam
    scheduler = create_scheduler(config["schedular"], optimizer, steps_per_epoch=3)
    lrs = []
    for _ in range(70 * 3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    per_epoch = lrs[::3]
    assert per_epoch[0] == per_epoch[19] == pytest.approx(2e-4)
    assert per_epoch[20] == per_epoch[39] == pytest.approx(2e-4 * 0.7)
    assert per_epoch[40] == pytest.approx(2e-4 * 0.49) and per_epoch[69] == pytest.approx(2e-4 * 0.343)
    assert lrs[60:63] == [per_epoch[20]] * 3


# --- the released code's text branch: skip-thoughts


def skipthoughts_files(folder: Path, words: list[str]) -> tuple[Path, np.ndarray]:
    """Small uni-skip files (4-d word vectors, 3-d state) whose dictionary holds all ``words`` but the last two."""
    rng = np.random.default_rng(0)
    dictionary = ["UNK", *words[:-2]]
    table = rng.standard_normal((len(dictionary), 4)).astype(np.float32)
    return write_original(folder, theano_params(rng, 4, 3), table, dictionary), table


def test_skipthoughts_text_branch_loads_the_original_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = amfmn_config(tmp_path, "text_arch=skipthoughts", "skipthoughts_widths=[4, 3]")
    words = build_model(config, pretrained=False).text_processor.words[1:]
    folder, table = skipthoughts_files(tmp_path / "st", words)
    caplog.set_level(logging.INFO, logger="models.encoders.skipthoughts")
    model = build_model({**config, "skipthoughts_dir": str(folder)})
    assert torch.equal(model.text_encoder.embedding.weight[1:-2], torch.from_numpy(table[1:]))
    assert torch.equal(model.text_encoder.embedding.weight[-1], torch.from_numpy(table[0]))  # <unk> -> UNK row
    assert f"2 not found, given the 'UNK' vector: {words[-2]!r}, {words[-1]!r}" in caplog.text
    model.eval()
    text = model.encode_text(model.text_processor(["white plane beside the runway", "red roof"]))
    assert text.shape == (2, 128) and (text >= 0).all()  # Linear(state -> 128) + ReLU
    assert set(model.encoders()) == {"image_encoder", "text_encoder"}
    with pytest.raises(Exception, match="text_encoder: text_arch is skipthoughts but skipthoughts_dir is not set"):
        build_model(config)


def port_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The skip-thoughts port's names for a uni-skip state: one layer per gate (r, z as 'i', n)."""
    out = {"embedding.weight": state["embedding.weight"]}
    for side in ("ih", "hh"):
        for gate, weight in zip("rin", state[f"gru.weight_{side}_l0"].chunk(3)):
            out[f"rnn.gru_cell.weight_{side[0]}{gate}.weight"] = weight
    for gate, bias in zip("rin", state["gru.bias_ih_l0"].chunk(3)):
        out[f"rnn.gru_cell.weight_i{gate}.bias"] = bias
    return out


def test_released_skipthoughts_checkpoint_loads_completely(tmp_path: Path) -> None:
    config = amfmn_config(tmp_path, "text_arch=skipthoughts", "skipthoughts_widths=[4, 3]", "att_type=fusion_att")
    torch.manual_seed(5)
    trained = build_model(config, pretrained=False)
    state = trained.state_dict()
    released = released_names({k: v for k, v in state.items() if not k.startswith(("text_encoder.", "text_proj."))})
    released.update({f"text_feature.seq2vec.{k}": v for k, v in port_names(with_prefix(state, "text_encoder.")).items()})
    released.update({f"text_feature.to_out.{k}": v for k, v in with_prefix(state, "text_proj.").items()})
    path = tmp_path / "amfmn_skipthoughts.pth.tar"
    torch.save({"model": released}, path)
    fresh = build_model(config, pretrained=False)
    report = load_for_evaluation(fresh, str(path), config)
    assert not report.missing
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


# --- the adaptive margin (AMFMN paper §III-E)


def test_adaptive_margin_at_hand_worked_points() -> None:
    """gamma 0.6, beta 5: 0.6 at S = 0; 0 at S = 1; at S = 0.5, 0.6 (e^5 - e^2.5) / (e^5 - 1)
    = 0.6 x (148.41316 - 12.18249) / 147.41316 = 0.554485; at S = 0.9, 0.6 x (148.41316 - 90.01713) / 147.41316
    = 0.237683: a caption much like the image's own gets a small margin."""
    margins = adaptive_margin(torch.tensor([0.0, 0.5, 1.0, 0.9], dtype=torch.float64), 0.6, 5.0)
    assert margins.tolist() == pytest.approx([0.6, 0.554485, 0.0, 0.237683], abs=1e-6)


def adaptive_triplet(tmp_path: Path, *overrides: str) -> tuple[TripletLoss, TrainAnnotations]:
    config = amfmn_config(tmp_path, "triplet_margin_mode=adaptive", *overrides)
    captions = ["a white plane parked beside the runway", "two white planes on the runway",
                "a red roof beside a green lawn", "many red roofs", "cars park beside the road",
                "a road with many cars", "a plane beside a road"]
    annotations = TrainAnnotations(captions=captions, image_index=[0, 0, 1, 1, 2, 2, 3])
    loss = TripletLoss(config)
    loss.prepare(annotations, tmp_path)
    return loss, annotations


def test_adaptive_triplet_uses_each_pairs_prior_similarity(tmp_path: Path) -> None:
    loss, annotations = adaptive_triplet(tmp_path)
    assert loss.sample_fields == ("caption_idx",)
    prior = prior_text_similarity([annotations.captions[0:2], annotations.captions[2:4], annotations.captions[4:6],
                                   annotations.captions[6:7]], annotations.captions)
    cached = np.load(tmp_path / PRIOR_SIMILARITY_FILE)
    assert np.array_equal(cached, prior)  # stored beside the run
    torch.manual_seed(6)
    v, t = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1), F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    image_idx, caption_idx = torch.tensor([0, 1, 2, 0, 3]), torch.tensor([1, 3, 4, 0, 6])
    inputs = LossInputs(v, t, {"image_idx": image_idx, "caption_idx": caption_idx}, {}, None, 5, 0)
    margins = 0.6 * (math.exp(5) - np.exp(5 * prior[image_idx][:, caption_idx])) / (math.exp(5) - 1)
    expected = triplet_loss(v @ t.T, image_idx, torch.from_numpy(margins))
    assert torch.allclose(loss(inputs), expected)
    assert not torch.allclose(loss(inputs), triplet_loss(v @ t.T, image_idx, 0.2))


def test_triplet_normalised_by_the_number_of_terms(tmp_path: Path) -> None:
    """SIRS: the sum divided by 2N^2 - 2N."""
    config = amfmn_config(tmp_path, "triplet_normalise=true")
    torch.manual_seed(7)
    v, t = torch.randn(6, 8), torch.randn(6, 8)
    ids = torch.arange(6)
    inputs = LossInputs(v, t, {"image_idx": ids}, {}, None, 6, 0)
    assert torch.allclose(TripletLoss(config)(inputs), triplet_loss(v @ t.T, ids, 0.2) / (2 * 36 - 12))


def test_adaptive_margin_needs_its_prior(tmp_path: Path) -> None:
    loss = TripletLoss(amfmn_config(tmp_path, "triplet_margin_mode=adaptive"))
    inputs = LossInputs(torch.eye(2), torch.eye(2), {"image_idx": torch.arange(2), "caption_idx": torch.arange(2)},
                        {}, None, 2, 0)
    with pytest.raises(RuntimeError, match="call prepare"):
        loss(inputs)


# --- end to end


def test_amfmn_demo_with_the_adaptive_margin_trains_far_above_chance(tmp_path: Path) -> None:
    """configs/demo_amfmn.yaml, smaller (20 train images per class, 2 epochs) and with the paper's adaptive
    margin, through run.py: the prior similarity is computed once into the run folder and a resumed run
    reads it back."""
    data, out = tmp_path / "data", tmp_path / "out"
    overrides = [f"synthetic_data.root={data}", "synthetic_data.train_per_class=20", f"train_file=[{data}/demo_train.json]",
                 f"val_file={data}/demo_val.json", f"test_file={data}/demo_test.json", f"image_root={data}/images",
                 "schedular.epochs=2", "triplet_margin_mode=adaptive"]
    command = [sys.executable, str(ROOT / "run.py"), "--task", "demo_amfmn", "--output_dir", str(out), "--dist", "cpu"]
    result = subprocess.run([*command, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "log.txt").read_text().splitlines()[-1])
    chance = chance_metrics([list(range(5 * i, 5 * i + 5)) for i in range(200)], 1000)["r_mean"]
    assert summary["test_at_best"]["r_mean"] > 5 * chance
    prior = np.load(out / PRIOR_SIMILARITY_FILE, mmap_mode="r")
    assert prior.shape == (200, 1000)  # 10 classes x 20 images, 5 captions each
    stamp = (out / PRIOR_SIMILARITY_FILE).stat().st_mtime_ns
    resumed = subprocess.run([*command, "--resume", *overrides, "schedular.epochs=3"], cwd=ROOT, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (out / PRIOR_SIMILARITY_FILE).stat().st_mtime_ns == stamp
