"""SIRS (baselines.md §5): the segmentation decoder, SSA and AMW against the released forward written out
step by step, the weighted pixel cross-entropy against its formula, released checkpoint names, and the
configurations without decoder or SSA."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import word_model_config, write_json
from dataset.annotations import TrainAnnotations
from dataset.masks import load_mask
from models import build_model
from models.encoders.resnet import ResNetEncoder
from models.fusion.segmentation import SSA, SegmentationDecoder
from models.loading import load_for_evaluation
from models.losses import LossInputs, SegmentationLoss
from utils.config import load_config
from utils.metrics import chance_metrics
from utils.seg_metrics import confusion_matrix, segmentation_scores

ROOT = Path(__file__).resolve().parents[1]


def sirs_config(tmp_path: Path, *overrides: str) -> dict:
    return word_model_config(tmp_path, "sirs", *overrides)


def released_decoder(decoder: SegmentationDecoder, stages: list[torch.Tensor]) -> torch.Tensor:
    """``seg_fpn_decoder_check.forward`` as released, with this decoder's weights."""
    c2, c3, c4, _ = stages
    p4, p3, p2 = decoder.latlayer1(c4), decoder.latlayer2(c3), decoder.latlayer3(c2)
    h, w = p2.shape[-2:]

    def up(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)

    s4 = up(F.relu(decoder.gn1(decoder.semantic_branch(p4))), h, w)
    s3 = up(F.relu(decoder.gn1(decoder.semantic_branch(p3))), h, w)
    s2 = F.relu(decoder.gn1(decoder.semantic_branch(p2)))
    return up(decoder.conv3(s2 + s3 + s4), 4 * h, 4 * w)


def test_decoder_at_paper_size_follows_the_released_forward() -> None:
    torch.manual_seed(0)
    backbone = ResNetEncoder("resnet18").eval()
    stages = backbone.forward_stages(torch.randn(2, 3, 256, 256))
    decoder = SegmentationDecoder(backbone.stage_channels, 15)
    logits = decoder(stages)
    assert logits.shape == (2, 15, 256, 256)
    assert torch.allclose(logits, released_decoder(decoder, stages), atol=1e-5)


@pytest.mark.parametrize("downsampling", ["averagePooling", "maxPooling", "interpolation"])
def test_ssa_multiplies_the_summed_foreground_into_every_stage(downsampling: str) -> None:
    """The released ``SMA``: att = sum of logits 1..14 (no softmax), resized to each stage, multiplied in."""
    torch.manual_seed(1)
    stages = [torch.randn(2, c, s, s) for c, s in ((64, 64), (128, 32), (256, 16), (512, 8))]
    logits = torch.randn(2, 15, 256, 256)
    out = SSA([64, 128, 256, 512], downsampling)(stages, logits)
    attention = logits[:, 1:].sum(1, keepdim=True)
    for stage, weighted in zip(stages, out):
        size = stage.shape[-1]
        if downsampling == "averagePooling":  # 256 / size pixels per cell: a plain block mean
            resized = attention.reshape(2, 1, size, 256 // size, size, 256 // size).mean((3, 5))
        elif downsampling == "maxPooling":
            resized = attention.reshape(2, 1, size, 256 // size, size, 256 // size).amax((3, 5))
        else:
            resized = F.interpolate(attention, scale_factor=size / 256, mode="bilinear", align_corners=False)
        assert torch.allclose(weighted, stage * resized, atol=1e-4)


def test_amw_embedding_scores_the_mean_of_the_four_stage_cosines(tmp_path: Path) -> None:
    """The released ``Visual_base_multi`` + ``cosine_similarity``, averaged over the 4 stages, equals the dot
    product of this model's image and text embeddings."""
    model = build_model(sirs_config(tmp_path), pretrained=False).eval()
    images = torch.randn(3, 3, 64, 64)
    text = model.text_processor(["white plane beside runway", "river crosses fields", "red roof", "boats"])
    with torch.no_grad():
        stages = model.image_encoder.forward_stages(images)
        stages = model.ssa(stages, model.decoder(stages))
        words = model.encode_words(text)
        released = sum(F.cosine_similarity(proj(stage.flatten(2).mean(-1))[:, None], words[None], dim=-1)
                       for proj, stage in zip(model.stage_proj, stages)) / 4
        scores = model.similarity(model.encode_image(images), model.encode_text(text))
    assert torch.allclose(scores, released, atol=1e-5)
    assert model.scores_are_dot_products


def test_configurations_without_decoder_or_ssa(tmp_path: Path) -> None:
    """RSICD/UCM: no decoder, no SSA; no AMW: one vector from stage 4. SSA without a decoder is refused."""
    plain = build_model(sirs_config(tmp_path, "seg_decoder=false", "ssa=false", "amw=false"), pretrained=False)
    assert plain.decoder is None and plain.ssa is None and plain.stage_proj is None
    out = plain({"images": torch.randn(2, 3, 64, 64), "text": plain.text_processor(["a plane", "a boat"])})
    assert set(out) == {"image_feat", "text_feat"} and plain.seg_classes == 0
    with pytest.raises(NotImplementedError, match="seg_decoder: false"):
        plain.segment(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="ssa: true needs seg_decoder: true"):
        build_model(sirs_config(tmp_path, "seg_decoder=false"), pretrained=False)
    full = build_model(sirs_config(tmp_path), pretrained=False)
    out = full({"images": torch.randn(2, 3, 64, 64), "text": full.text_processor(["a plane", "a boat"])})
    assert out["seg_logits"].shape == (2, 15, 64, 64) and full.seg_classes == 15


def test_paper_size_parameter_count(tmp_path: Path) -> None:
    """ResNet-18 (no classifier) + the decoder's used layers + 4 AMW projections + bi-GRU over 1,350 words."""
    vocab = write_json(tmp_path / "vocab.json", {"word2idx": {**{f"w{i}": i + 1 for i in range(1348)}, "<unk>": 1349}})
    model = build_model(load_config(ROOT / "configs" / "Retrieval_rsitmd_sirs.yaml", [f"vocab_file={vocab}"]),
                        pretrained=False)
    d = 512
    resnet18 = 11_689_512 - (512 * 1000 + 1000)
    decoder = (256 * 256 + 256) + (128 * 256 + 256) + (64 * 256 + 256) + (256 * 128 + 128) + 2 * 128 + (128 * 15 + 15)
    amw = sum(c * d + d for c in (64, 128, 256, 512))
    gru = 1350 * 300 + 2 * 3 * (300 * d + d * d + 2 * d)
    assert sum(p.numel() for p in model.parameters()) == resnet18 + decoder + amw + gru


def released_irseg_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in SIRS's released ``IRSeg`` layout, written from this model's, with the decoder's
    never-called layers."""
    renames = {"image_encoder.": "extract_feature.resnet.", "decoder.": "decoder.", "text_encoder.": "text_feature.seq2vec."}
    renames |= {f"stage_proj.{k}.": f"visual_feature.mapping{k + 1}." for k in range(4)}
    out = {}
    for key, value in state.items():
        prefix = next(p for p in renames if key.startswith(p))
        out[renames[prefix] + key[len(prefix):]] = value
    out["decoder.toplayer.weight"] = torch.zeros(256, 512, 1, 1)
    out["decoder.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    return out


def test_released_irseg_checkpoint_loads_completely(tmp_path: Path) -> None:
    config = sirs_config(tmp_path)
    torch.manual_seed(2)
    trained = build_model(config, pretrained=False)
    path = tmp_path / "irseg_best.pth"
    torch.save({"model": released_irseg_names(trained.state_dict())}, path)
    fresh = build_model(config, pretrained=False)
    report = load_for_evaluation(fresh, str(path), config)
    assert not report.missing and any("toplayer" in entry for entry in report.unexpected)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_seg_loss_is_the_weighted_pixel_cross_entropy_over_the_batch(tmp_path: Path) -> None:
    """sum_i w_{y_i} (-log p_i(y_i)) / sum_i w_{y_i} over the pixels that are not 255, divided by the batch size;
    the class weights max_k(count_k) / count_c come from the training masks (``prepare``)."""
    masks = tmp_path / "masks"
    masks.mkdir()
    pixels = np.zeros((4, 4), np.uint8)
    pixels[:2, :] = 10  # 8 plane pixels, 7 background, 1 ignored: weights background 8/7, plane 1
    pixels[3, 3] = 255
    Image.fromarray(pixels).save(masks / "mask_a.png")
    loss = SegmentationLoss(sirs_config(tmp_path, "num_workers=0"))
    loss.prepare(TrainAnnotations(mask_paths=[str(masks / "mask_a.png")]), tmp_path)
    assert loss.class_weights[:2].tolist() == pytest.approx([8 / 7, 1.0]) and loss.class_weights[2:].sum() == 0
    torch.manual_seed(3)
    logits = torch.randn(2, 15, 4, 4, dtype=torch.float64)
    target = torch.randint(0, 2, (2, 4, 4))
    target[0, 0, 0] = 255
    value = loss(LossInputs(torch.zeros(2, 4), torch.zeros(2, 4), {}, {"seg_logits": logits}, None, 2, 0,
                            batch={"mask": target}))
    log_p = logits.log_softmax(1)
    numerator = denominator = 0.0
    for b in range(2):
        for y in range(4):
            for x in range(4):
                c = int(target[b, y, x])
                if c != 255:
                    numerator += float(loss.class_weights[c]) * -float(log_p[b, c, y, x])
                    denominator += float(loss.class_weights[c])
    assert float(value) == pytest.approx(numerator / denominator / 2)


def test_seg_loss_needs_masks(tmp_path: Path) -> None:
    loss = SegmentationLoss(sirs_config(tmp_path))
    with pytest.raises(ValueError, match="set mask_root"):
        loss.prepare(TrainAnnotations(), tmp_path)


def test_sirs_demo_retrieves_and_segments_far_above_chance(tmp_path: Path) -> None:
    """configs/demo_sirs.yaml, smaller (20 train images per class, 2 epochs), through run.py: recalls far above
    chance, and test mIoU far above that of a constant background prediction on the same masks."""
    data, out = tmp_path / "data", tmp_path / "out"
    overrides = [f"synthetic_data.root={data}", "synthetic_data.train_per_class=20", f"train_file=[{data}/demo_train.json]",
                 f"val_file={data}/demo_val.json", f"test_file={data}/demo_test.json", f"image_root={data}/images",
                 f"mask_root={data}/masks", "schedular.epochs=2"]
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "--task", "demo_sirs", "--output_dir", str(out),
                             "--dist", "cpu", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    best = {r["epoch"]: r for r in records[:-1]}[records[-1]["best_epoch"]]
    chance = chance_metrics([list(range(5 * i, 5 * i + 5)) for i in range(200)], 1000)["r_mean"]
    assert best["test_r_mean"] > 5 * chance
    test_images = [entry["image"] for entry in json.loads((data / "demo_test.json").read_text())]
    test_masks = torch.stack([torch.from_numpy(load_mask(str(data / "masks" / f"mask_{Path(name).stem}.png"))).long()
                              for name in test_images])
    constant = segmentation_scores(confusion_matrix(torch.zeros_like(test_masks), test_masks, 15))["seg_miou"]
    assert best["test_seg_miou"] > 2 * constant
    assert {"val_seg_pixel_acc", "val_seg_class_acc", "val_seg_miou", "val_seg_fwiou"} <= set(best)
