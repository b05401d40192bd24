"""User weights: a model built on a user's local CLIP / SegFormer / OneFormer folder (transformers format) of
another width than the config records the architecture actually loaded, round-trips through its checkpoint,
exports, and every mismatch is one clear error. The folders are small random transformers models built here from
configs and saved with ``save_pretrained``: nothing downloads."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from geosurge.errors import GeosurgeError
from geosurge.geo import build_hierarchy
from geosurge.models import GeoSurge, get_config
from geosurge.models.config import GeoSurgeConfig, SegmenterConfig
from geosurge.models.info import checkpoint_info, model_info

# a CLIP-style image processor of its own: crop 32 after a shortest-edge resize to 36, its own mean / std
CLIP_PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_center_crop": True, "crop_size": {"height": 32,
                  "width": 32}, "size": {"shortest_edge": 36}, "resample": 3, "image_mean": [0.5, 0.4, 0.3],
                  "image_std": [0.25, 0.2, 0.3]}
SEG_PROCESSOR = {"image_processor_type": "SegformerImageProcessor", "image_mean": [0.4, 0.4, 0.4],
                 "image_std": [0.2, 0.2, 0.2], "resample": 2}
# OneFormer's processor normalises 0..255 pixels (ImageNet mean / std x 255)
ONEFORMER_PROCESSOR = {"image_processor_type": "OneFormerImageProcessor", "image_mean": [123.675, 116.28, 103.53],
                       "image_std": [58.395, 57.12, 57.375]}


@pytest.fixture(scope="module")
def hierarchy():
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 60, 200), rng.uniform(-180, 180, 200)
    return build_hierarchy(lat, lon, tau_max=[60, 20], tau_min=2, max_s2_level=10)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three user folders, none at the widths of the ``tiny`` config (CLIP 48 wide, 16 px patches at 64 px)."""
    from transformers import (CLIPConfig, CLIPModel, CLIPTokenizer, OneFormerConfig,
                              OneFormerForUniversalSegmentation, SegformerConfig, SegformerForSemanticSegmentation,
                              SwinConfig)

    root = tmp_path_factory.mktemp("user_weights")
    torch.manual_seed(0)
    # a full CLIPModel folder (vision + text towers), as CLIP checkpoints are distributed; GELU, not quick_gelu
    clip = CLIPConfig(vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=2, patch_size=8, image_size=32, hidden_act="gelu"),
                      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=1,
                                       pad_token_id=1),
                      projection_dim=16)
    CLIPModel(clip).save_pretrained(root / "clip")
    (root / "clip" / "preprocessor_config.json").write_text(json.dumps(CLIP_PROCESSOR))
    seg = SegformerConfig(num_labels=7, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                          num_attention_heads=[1, 1, 1, 2], decoder_hidden_size=16)
    SegformerForSemanticSegmentation(seg).save_pretrained(root / "segformer")
    (root / "segformer" / "preprocessor_config.json").write_text(json.dumps(SEG_PROCESSOR))
    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                      drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    one = OneFormerConfig(backbone_config=swin, num_queries=6, conv_dim=32, mask_dim=32, hidden_dim=32,
                          encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                          num_attention_heads=2, task_seq_len=12, id2label={i: f"class{i}" for i in range(5)})
    OneFormerForUniversalSegmentation(one).save_pretrained(root / "oneformer")
    (root / "oneformer" / "preprocessor_config.json").write_text(json.dumps(ONEFORMER_PROCESSOR))
    # a character-level CLIP tokenizer stands in for the CLIP BPE vocabulary OneFormer folders ship
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root / "oneformer")
    return root


def user_config(clip=None, segmenter=None, kind="segformer") -> GeoSurgeConfig:
    cfg = get_config("tiny")
    return replace(cfg, backbone=replace(cfg.backbone, pretrained=str(clip) if clip else None),
                   segmenter=replace(cfg.segmenter, kind=kind, pretrained=str(segmenter) if segmenter else None))


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_clip_and_segformer_folders_decide_the_architecture_and_round_trip(folders, hierarchy, tmp_path):
    from safetensors.torch import load_file

    # copies, deleted once saved: the checkpoint must not need the folders
    clip, seg = shutil.copytree(folders / "clip", tmp_path / "clip"), shutil.copytree(folders / "segformer",
                                                                                        tmp_path / "seg")
    model = GeoSurge(user_config(clip, seg), hierarchy).eval()
    bb, sg, pre = model.config.backbone, model.config.segmenter, model.config.preprocess
    assert (bb.hidden_size, bb.intermediate_size, bb.num_layers, bb.num_heads, bb.patch_size, bb.image_size) == \
        (32, 40, 2, 2, 8, 32)
    assert bb.hf_config["hidden_act"] == "gelu" and bb.pretrained == str(clip)
    # input: the crop follows the weights (32), the resize keeps the processor's 36/32, its mean/std/bicubic
    assert (pre.size, pre.resize_size, pre.interpolation) == (32, 36, "bicubic")
    assert pre.mean == (0.5, 0.4, 0.3) and pre.std == (0.25, 0.2, 0.3)
    assert (sg.num_classes, sg.hidden_sizes, sg.depths, sg.num_heads, sg.decoder_hidden_size) == \
        (7, (8, 8, 16, 16), (1, 1, 1, 1), (1, 1, 1, 2), 16)
    assert sg.mean == (0.4, 0.4, 0.4) and sg.std == (0.2, 0.2, 0.2)
    # derived widths: fusion input = CLIP width, semantic projection = class count, grid = 32 / 8
    assert model.fusion.rgb_proj.in_features == 32 and model.semantic.proj.in_features == 7
    assert model.backbone.grid == 4
    # the weights are the folder's (the vision tower of the full CLIPModel), not a fresh init
    folder_state = load_file(str(clip / "model.safetensors"))
    torch.testing.assert_close(model.backbone.vision.embeddings.patch_embedding.weight,
                               folder_state["vision_model.embeddings.patch_embedding.weight"], rtol=0, atol=0)
    # the segmenter re-normalises the model input (CLIP processor's) for its own processor's mean / std
    torch.testing.assert_close(model.segmenter.scale.flatten(), torch.tensor([0.25, 0.2, 0.3]) / 0.2)

    ck = model.save_pretrained(tmp_path / "ck")
    shutil.rmtree(clip), shutil.rmtree(seg)
    loaded = GeoSurge.from_pretrained(ck)
    assert loaded.config.to_dict() == model.config.to_dict()
    x = torch.randn(2, 3, 32, 32)
    a, b = outputs(model, x), outputs(loaded, x)
    assert torch.equal(a["embedding"], b["embedding"]) and torch.equal(a["seg_logits"], b["seg_logits"])
    assert all(torch.equal(p, q) for p, q in zip(a["level_logits"], b["level_logits"]))
    info = {r["part"]: r for r in checkpoint_info(ck)["weights"]}
    assert str(clip) in info["backbone"]["source"] and "32 wide" in info["backbone"]["architecture"]
    assert "7 classes" in info["segmenter"]["architecture"]


@pytest.fixture(scope="module")
def user_checkpoint(folders, hierarchy, tmp_path_factory):
    torch.manual_seed(0)
    model = GeoSurge(user_config(folders / "clip", folders / "segformer"), hierarchy)
    return model.save_pretrained(tmp_path_factory.mktemp("ck") / "user")


def test_export_and_model_info_of_a_checkpoint_on_user_weights(user_checkpoint, folders, tmp_path, capsys):
    from geosurge.cli import main
    from geosurge.runtime import open_bundle, verify_bundle

    assert main(["export", "--checkpoint", str(user_checkpoint), "-o", str(tmp_path / "bundle")]) == 0
    spec = open_bundle(tmp_path / "bundle").manifest.preprocess
    assert spec.size == 32 and spec.mean == (0.5, 0.4, 0.3)
    # the exported graph reproduces the torch model on the golden photos (onnxruntime vs FP32 torch)
    assert verify_bundle(tmp_path / "bundle")["passed"]
    capsys.readouterr()
    assert main(["model", "info", "--checkpoint", str(user_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "CLIP ViT: 32 wide, 2 layers, 2 heads, MLP 40 (gelu), patch 8 @ 32 px" in out
    assert f"checkpoint (built on folder {folders / 'clip'})" in out
    assert "SegFormer: widths [8, 8, 16, 16]" in out and "7 classes" in out


def test_a_checkpoint_that_does_not_record_its_architecture_is_one_clear_error(user_checkpoint, tmp_path, capsys):
    # what checkpoints of models on user weights held before: the config's widths, not the weights'
    ck = shutil.copytree(user_checkpoint, tmp_path / "old")
    meta = json.loads((ck / "config.json").read_text())
    tiny = get_config("tiny").to_dict()
    meta["config"]["backbone"] = {**tiny["backbone"], "pretrained": meta["config"]["backbone"]["pretrained"]}
    meta["config"]["preprocess"] = tiny["preprocess"]
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GeosurgeError, match=r"model\.safetensors: \d+ tensor\(s\) do not fit the architecture of "
                                            r".*config\.json.*\(32, 3, 8, 8\) vs \(48, 3, 16, 16\)"):
        GeoSurge.from_pretrained(ck)
    from geosurge.cli import main

    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ck), "-o", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.safetensors" in err and " vs " in err
    assert not (tmp_path / "bundle").exists()


def test_user_folders_that_cannot_be_loaded_are_one_clear_error(folders, hierarchy, tmp_path):
    with pytest.raises(GeosurgeError, match="must be a local transformers folder.*nothing is downloaded"):
        GeoSurge(user_config(clip=tmp_path / "nowhere"), hierarchy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeosurgeError, match="no config.json"):
        GeoSurge(user_config(clip=tmp_path / "empty"), hierarchy)
    # weights that do not fit the folder's own config.json
    bad = shutil.copytree(folders / "clip", tmp_path / "bad")
    meta = json.loads((bad / "config.json").read_text())
    meta["vision_config"]["hidden_size"] = 48
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GeosurgeError, match=r"bad: \d+ CLIP vision tensor\(s\) do not fit the folder's own "
                                            r"config.json: .*\(32,?\) vs \(48,?\)"):
        GeoSurge(user_config(clip=bad), hierarchy)
    # an image-processor config that is not one
    odd = shutil.copytree(folders / "clip", tmp_path / "odd")
    (odd / "preprocessor_config.json").write_text('{"image_mean": ["a", 1, 2], "image_std": [1, 1, 1]}')
    with pytest.raises(GeosurgeError, match=r"odd/preprocessor_config.json: unreadable image-processor config"):
        GeoSurge(user_config(clip=odd), hierarchy)
    # weights missing: the folder's config and no tensors of it
    (tmp_path / "nothing").mkdir()
    shutil.copy(folders / "segformer" / "config.json", tmp_path / "nothing")
    with pytest.raises(GeosurgeError, match="nothing: cannot load SegFormer weights"):
        GeoSurge(user_config(segmenter=tmp_path / "nothing"), hierarchy)
    # a folder of another model type
    with pytest.raises(GeosurgeError, match=r"config.json: not a SegFormer config"):
        GeoSurge(user_config(segmenter=folders / "oneformer"), hierarchy)


def test_oneformer_folder_semantic_map_and_round_trip(folders, hierarchy, tmp_path):
    from transformers import OneFormerImageProcessor

    model = GeoSurge(user_config(segmenter=folders / "oneformer", kind="oneformer"), hierarchy).eval()
    sg = model.config.segmenter
    assert sg.kind == "oneformer" and sg.num_classes == 5 and sg.hf_config["num_queries"] == 6
    assert model.semantic.proj.in_features == 5
    # 0..255 processor statistics come out on our [0, 1] scale
    np.testing.assert_allclose(sg.mean, (0.485, 0.456, 0.406), atol=1e-6)
    np.testing.assert_allclose(sg.std, (0.229, 0.224, 0.225), atol=1e-6)
    # the task prompt, tokenised by the folder's tokenizer as OneFormerProcessor does (padded to task_seq_len)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(folders / "oneformer"))(
        ["the task is semantic"], padding="max_length", max_length=12, truncation=True)["input_ids"]
    assert model.segmenter.task_inputs.tolist() == [[float(i) for i in ids[0]]]

    x = torch.randn(2, 3, 64, 64)
    seg = outputs(model, x)["seg_logits"]
    assert seg.shape == (2, 5, 16, 16)
    # the semantic map is OneFormer's own semantic post-processing (transformers' reference), normalised
    with torch.no_grad():
        raw = model.segmenter.model(pixel_values=x * model.segmenter.scale + model.segmenter.shift,
                                    task_inputs=model.segmenter.task_inputs.expand(2, -1))
    ref = [m for m in OneFormerImageProcessor().post_process_semantic_segmentation(raw)]
    assert all(torch.equal(seg[i].argmax(0), ref[i]) for i in range(2))
    torch.testing.assert_close(seg.softmax(1).sum(1), torch.ones(2, 16, 16))

    ck = model.save_pretrained(tmp_path / "ck")
    loaded = GeoSurge.from_pretrained(ck)
    assert torch.equal(loaded.segmenter.task_inputs, model.segmenter.task_inputs)
    a, b = outputs(model, x), outputs(loaded, x)
    assert torch.equal(a["embedding"], b["embedding"]) and torch.equal(a["seg_logits"], b["seg_logits"])
    # model info counts it (its data-dependent checks cannot run on the meta device: the segmenter is counted
    # on CPU) and says what was loaded
    info = checkpoint_info(ck)
    seg_row = next(r for r in info["parts"] if r["part"] == "segmenter")
    assert seg_row["GFLOPs"] > 0 and seg_row["params_M"] > 0
    assert "OneFormer (swin): 6 queries" in next(r for r in info["weights"] if r["part"] == "segmenter")["architecture"]

    # without its tokenizer the folder cannot encode the task prompt
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(folders / "oneformer" / f, no_tok)
    with pytest.raises(GeosurgeError, match="OneFormer needs the folder's tokenizer"):
        GeoSurge(user_config(segmenter=no_tok, kind="oneformer"), hierarchy)


def test_config_plumbing_records_the_loaded_architecture():
    """The recorded transformers config survives JSON; named fields win over it; a oneformer config without a
    folder is the default OneFormer (ADE20K's 150 classes)."""
    from geosurge.models.backbone import clip_vision_config
    from geosurge.models.config import BackboneConfig

    hf = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
          "num_attention_heads": 2, "patch_size": 8, "image_size": 32, "hidden_act": "gelu", "layer_norm_eps": 1e-6}
    cfg = replace(get_config("tiny"), backbone=BackboneConfig(hidden_size=64, intermediate_size=40, num_layers=2,
                                                              num_heads=2, patch_size=8, image_size=32, hf_config=hf))
    again = GeoSurgeConfig.from_json(cfg.to_json())
    assert again == cfg and again.backbone.hf_config == hf
    vc = clip_vision_config(again.backbone)
    assert (vc.hidden_size, vc.hidden_act, vc.layer_norm_eps) == (64, "gelu", 1e-6)
    assert clip_vision_config(BackboneConfig()).hidden_act == "quick_gelu"  # OpenAI CLIP's, without a record
    assert SegmenterConfig(kind="oneformer").num_classes == 150


def test_timm_weight_files_of_another_shape_and_pickles_are_refused(tmp_path, capsys):
    import timm

    from geosurge.models.backbone import build_backbone

    state = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    state["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(state, tmp_path / "other.pth")
    cfg = replace(get_config("edge").backbone, pretrained=str(tmp_path / "other.pth"))
    with pytest.raises(GeosurgeError, match=r"other.pth: 1 tensor\(s\) do not fit the architecture of timm "
                                            r"tf_efficientnet_lite0 .*conv_stem.weight \(16, 3, 3, 3\) vs "
                                            r"\(32, 3, 3, 3\)"):
        build_backbone(cfg)
    # a pickle that would call a function is refused by torch.load(weights_only=True), never executed
    torch.save({"conv_stem.weight": _Payload()}, tmp_path / "pickle.pth")
    with pytest.raises(GeosurgeError, match="pickle.pth: not a plain tensor state_dict"):
        build_backbone(replace(cfg, pretrained=str(tmp_path / "pickle.pth")))
    assert "payload ran" not in capsys.readouterr().out
    # a plain container of something else than tensors
    torch.save({"conv_stem.weight": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(GeosurgeError, match="list.pth: expected a state_dict of tensors"):
        build_backbone(replace(cfg, pretrained=str(tmp_path / "list.pth")))


class _Payload:
    def __reduce__(self):
        return print, ("payload ran",)


def test_model_info_reads_the_folders_without_loading_weights(folders, hierarchy, tmp_path):
    info = model_info(user_config(folders / "clip", folders / "segformer"), hierarchy)
    assert info["input"] == [1, 3, 32, 32]
    rows = {r["part"]: r for r in info["weights"]}
    assert rows["backbone"]["source"] == f"folder {folders / 'clip'}"
    assert rows["input"]["source"] == "config + backbone folder"
    plain = {r["part"]: r for r in model_info(get_config("tiny"), hierarchy)["weights"]}
    assert plain["backbone"]["source"] == "random init" and "48 wide" in plain["backbone"]["architecture"]


def test_parts_built_alone_take_the_folder_architecture(folders):
    """build_backbone / build_segmenter without GeoSurge's resolution still build what the folder holds."""
    from geosurge.models.backbone import build_backbone
    from geosurge.models.segmentation import build_segmenter

    cfg = get_config("tiny")
    bb = build_backbone(replace(cfg.backbone, pretrained=str(folders / "clip")))
    assert (bb.out_channels, bb.grid, bb.cfg.hidden_size) == (32, 4, 32)
    seg = build_segmenter(replace(cfg.segmenter, kind="segformer", pretrained=str(folders / "segformer")), 32,
                          cfg.preprocess.mean, cfg.preprocess.std)
    assert seg.model.config.num_labels == 7
