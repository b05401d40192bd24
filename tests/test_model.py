"""The GeoSURGE model: shapes for all configs, parameter arithmetic of the full paper config, the hierarchical
product, real EfficientNet-Lite0 weights, GeoCLIP initialisation, checkpoints."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from geosurge.errors import GeosurgeError
from geosurge.geo import build_hierarchy, haversine_km
from geosurge.models import GeoSurge, build_model, get_config
from geosurge.models.config import GeoSurgeConfig
from geosurge.models.info import model_info
from geosurge.preprocess import PreprocessSpec

from .synthetic import LOCATIONS


@pytest.fixture(scope="module")
def small_hierarchy():
    rng = np.random.default_rng(0)
    pts = np.concatenate([np.array(LOCATIONS)[rng.integers(0, 12, 600)] + rng.normal(0, 2, (600, 2))])
    return build_hierarchy(np.clip(pts[:, 0], -90, 90), pts[:, 1], tau_max=[150, 60, 20], tau_min=2, max_s2_level=14)


def reduced_paper_config() -> GeoSurgeConfig:
    """The paper's classes and layout (CLIP ViT + SegFormer + 3 fusion blocks) at reduced width."""
    cfg = get_config("paper")
    return replace(cfg,
                   backbone=replace(cfg.backbone, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                                    image_size=112, trainable_blocks=1),
                   segmenter=replace(cfg.segmenter, hidden_sizes=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                     num_heads=(1, 1, 1, 1), decoder_hidden_size=32),
                   fusion=replace(cfg.fusion, dim=48, num_heads=4),
                   head=replace(cfg.head, embed_dim=64),
                   preprocess=replace(cfg.preprocess, size=112, resize_size=112))


@pytest.mark.parametrize("name", ["tiny", "edge", "paper-reduced"])
def test_forward_shapes(name, small_hierarchy):
    cfg = reduced_paper_config() if name == "paper-reduced" else get_config(name)
    if name == "edge":
        cfg = replace(cfg, head=replace(cfg.head, init_from_geoclip=False))
    model = GeoSurge(cfg, small_hierarchy).eval()
    s = cfg.preprocess.size
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        out = model(x)
    d = cfg.head.embed_dim
    assert out["embedding"].shape == (2, d)
    torch.testing.assert_close(out["embedding"].norm(dim=-1), torch.ones(2))
    assert out["seg_logits"].shape[:2] == (2, cfg.segmenter.num_classes)
    assert [lg.shape for lg in out["level_logits"]] == [(2, n) for n in small_hierarchy.sizes]
    pred = model.predict(x, top_k=3)
    assert pred["cell"].shape == (2, 3) and pred["latlon"].shape == (2, 3, 2)
    assert (pred["log_score"][:, :-1] >= pred["log_score"][:, 1:]).all()


def test_trainable_blocks_freezes_all_but_the_last(small_hierarchy):
    model = GeoSurge(reduced_paper_config(), small_hierarchy)
    blocks = model.backbone.blocks()
    assert all(not p.requires_grad for b in blocks[:-1] for p in b.parameters())
    assert all(p.requires_grad for p in blocks[-1].parameters())
    assert all(p.requires_grad for p in model.backbone.vision.post_layernorm.parameters())
    assert not model.backbone.vision.embeddings.patch_embedding.weight.requires_grad


def test_full_paper_config_by_parameter_arithmetic(default_hierarchy):
    info = {r["part"]: r for r in model_info(get_config("paper"), default_hierarchy)["parts"]}
    # CLIP ViT-L/14 @ 336: patch conv, class token, 577 positions, pre-LN, 24 x (attn + 2 LN + MLP), post-LN
    d, mlp, layers, n_pos = 1024, 4096, 24, (336 // 14) ** 2 + 1
    per_layer = 4 * (d * d + d) + 2 * 2 * d + (d * mlp + mlp) + (mlp * d + d)
    vit = 3 * 14 * 14 * d + d + n_pos * d + 2 * d + layers * per_layer + 2 * d
    assert vit == 303_507_456
    assert round(info["backbone"]["params_M"] * 1e6) == vit
    # fusion: 2 input projections, 3 blocks (4 LN; q/k/v/out of the cross- and of the query self-attention; MLP x4),
    # final LN + linear to 768
    f, e = 768, 768
    block = 4 * 2 * f + 2 * 4 * (f * f + f) + (f * 4 * f + 4 * f) + (4 * f * f + f)
    fusion = 2 * (d * f + f) + 3 * block + 2 * f + (f * e + e)
    assert round(info["fusion"]["params_M"] * 1e6) == fusion
    assert round(info["cell_tables"]["params_M"] * 1e6) == len(default_hierarchy) * 768 + 7
    assert 80 < info["segmenter"]["params_M"] < 90  # SegFormer-B5-class, 150 ADE20K classes, + token projection
    assert 350 < info["backbone"]["GFLOPs"] < 400  # ViT-L/14 @ 336: ~191 GMACs


def test_hierarchical_product_equals_brute_force(small_hierarchy):
    model = GeoSurge(get_config("tiny"), small_hierarchy)
    torch.manual_seed(0)
    logps = [torch.randn(3, n).log_softmax(-1) for n in small_hierarchy.sizes]
    fast = model.head.hierarchical_scores(logps)
    L = small_hierarchy.num_levels
    brute = torch.zeros(3, small_hierarchy.sizes[-1])
    for f in range(small_hierarchy.sizes[-1]):
        cell = f
        for k in range(L - 1, -1, -1):
            brute[:, f] += logps[k][:, cell]
            if k:
                cell = int(small_hierarchy.level(k).parent[cell])
    torch.testing.assert_close(fast, brute)


def test_real_efficientnet_lite0_weights_classify_real_photos():
    import skimage.data

    from geosurge.models.backbone import build_backbone
    from geosurge.preprocess import preprocess

    cfg = get_config("edge")
    bb = build_backbone(cfg.backbone).eval()
    expected = {"chelsea": range(281, 286), "coffee": [967], "rocket": [657, 812]}  # cats; espresso; missile/space
    for name, classes in expected.items():
        x = torch.from_numpy(preprocess(getattr(skimage.data, name)(), cfg.preprocess))[None]
        with torch.no_grad():
            top1 = int(bb.classify(x).argmax())
        assert top1 in classes, (name, top1)


def test_geoclip_initialised_cells_are_geographically_meaningful(small_hierarchy):
    cfg = get_config("tiny")
    cfg = replace(cfg, head=replace(cfg.head, embed_dim=512, init_from_geoclip=True))
    model = GeoSurge(cfg, small_hierarchy)
    lv = small_hierarchy.level(-1)
    emb = torch.nn.functional.normalize(model.head.tables[-1].detach(), dim=-1)
    sim = emb @ emb.t()
    sim.fill_diagonal_(-2)
    nn_idx = sim.argmax(1).numpy()
    d_nn = haversine_km(lv.rep_lat, lv.rep_lon, lv.rep_lat[nn_idx], lv.rep_lon[nn_idx])
    rng = np.random.default_rng(0)
    rand = rng.integers(0, len(lv), len(lv))
    d_rand = haversine_km(lv.rep_lat, lv.rep_lon, lv.rep_lat[rand], lv.rep_lon[rand])
    assert np.median(d_nn) < 0.05 * np.median(d_rand)


def test_checkpoint_roundtrip_is_bit_exact(tmp_path, small_hierarchy):
    torch.manual_seed(0)
    model = GeoSurge(get_config("tiny"), small_hierarchy).eval()
    path = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["cells.npz", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = GeoSurge.from_pretrained(path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.embed(x), loaded.embed(x))
    assert loaded.config.to_dict() == model.config.to_dict()
    # saving again over an existing checkpoint replaces it whole
    model.save_pretrained(path)
    assert GeoSurge.from_pretrained(path).hierarchy.digest() == small_hierarchy.digest()


def test_checkpoint_errors(tmp_path, small_hierarchy):
    with pytest.raises(GeosurgeError, match="not a geosurge checkpoint"):
        GeoSurge.from_pretrained(tmp_path)
    model = GeoSurge(get_config("tiny"), small_hierarchy)
    path = model.save_pretrained(tmp_path / "ckpt")
    other = build_hierarchy([0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], tau_max=[5], tau_min=2)
    other.save(path / "cells.npz")
    with pytest.raises(GeosurgeError, match="does not match"):
        GeoSurge.from_pretrained(path)


def test_config_json_roundtrip():
    for name in ("paper", "edge", "tiny"):
        cfg = get_config(name)
        again = GeoSurgeConfig.from_json(cfg.to_json())
        assert again == cfg
        assert isinstance(again.preprocess, PreprocessSpec)
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown field"):
        GeoSurgeConfig.from_dict({"backbone": {"nope": 1}})


def test_build_model_by_name(small_hierarchy):
    m = build_model("tiny", small_hierarchy)
    assert m.config.name == "tiny" and m.head.sizes == small_hierarchy.sizes


def test_tencrop_prediction_averages_crop_probabilities(small_hierarchy):
    import skimage.data

    from geosurge.preprocess import preprocess, ten_crop

    model = GeoSurge(get_config("tiny"), small_hierarchy).eval()
    img = skimage.data.chelsea()
    crops = torch.from_numpy(ten_crop(img, model.config.preprocess))
    assert crops.shape == (10, 3, 64, 64)
    # the centre crop equals the ordinary preprocessing; crop 5 + i is crop i mirrored
    np.testing.assert_allclose(crops[4].numpy(), preprocess(img, model.config.preprocess), atol=1e-6)
    torch.testing.assert_close(crops[5], crops[0].flip(-1))
    pred = model.predict(crops, top_k=3, crops_per_image=10)
    with torch.no_grad():
        logps = model.head.level_log_probs(model.embed(crops))
    manual = model.head.hierarchical_scores([lp.exp().mean(0, keepdim=True).log() for lp in logps])
    torch.testing.assert_close(pred["log_score"], manual.topk(3).values)


def _seg_swap_embeddings(model, seed=0):
    """The embedding of the same backbone features with two different segmentation maps."""
    torch.manual_seed(seed)
    s = model.config.preprocess.size
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        feats = model.backbone(x)
        seg = model.segmenter(x, feats.feature_map)
        a = model.forward_features(feats, x, seg_logits=seg)["embedding"]
        b = model.forward_features(feats, x, seg_logits=torch.randn_like(seg) * 5)["embedding"]
    return a, b


@pytest.mark.parametrize("name", ["tiny", "nano", "paper-reduced"])
def test_the_segmentation_map_reaches_the_embedding(name, small_hierarchy):
    cfg = reduced_paper_config() if name == "paper-reduced" else get_config(name)
    assert cfg.fusion.query_self_attention  # every named config fuses the semantic tokens into the CLS
    model = GeoSurge(cfg, small_hierarchy).eval()
    a, b = _seg_swap_embeddings(model)
    assert (a - b).abs().max() > 1e-3  # a different map moves the (unit-norm) embedding visibly
    # and the segmenter head gets a gradient from the per-level InfoNCE
    from geosurge.training.train import level_losses

    model.train()
    s = cfg.preprocess.size
    out = model(torch.randn(2, 3, s, s))
    sum(level_losses(out["level_logits"], torch.zeros(2, small_hierarchy.num_levels, dtype=torch.long))).backward()
    grads = [p.grad for p in model.semantic.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_without_query_self_attention_the_map_has_no_effect(small_hierarchy):
    """The behaviour before the fix (and of checkpoints written then): cross-attention only, the CLS never reads a
    semantic token, so the embedding is exactly independent of the segmentation map."""
    cfg = get_config("tiny")
    cfg = replace(cfg, fusion=replace(cfg.fusion, query_self_attention=False))
    model = GeoSurge(cfg, small_hierarchy).eval()
    a, b = _seg_swap_embeddings(model)
    assert torch.equal(a, b)
    assert all(blk.self_attn is None for blk in model.fusion.blocks)


def test_a_checkpoint_from_before_the_fix_loads_with_the_old_fusion(tmp_path, small_hierarchy):
    import json

    cfg = get_config("tiny")
    torch.manual_seed(1)
    old = GeoSurge(replace(cfg, fusion=replace(cfg.fusion, query_self_attention=False)), small_hierarchy).eval()
    ck = old.save_pretrained(tmp_path / "old")
    meta = json.loads((ck / "config.json").read_text())
    del meta["config"]["fusion"]["query_self_attention"]  # what a config.json written before the field looks like
    (ck / "config.json").write_text(json.dumps(meta))
    loaded = GeoSurge.from_pretrained(ck).eval()
    assert loaded.config.fusion.query_self_attention is False
    assert not any(k.startswith("fusion.") and "self_attn" in k for k in loaded.state_dict())
    x = torch.randn(2, 3, cfg.preprocess.size, cfg.preprocess.size)
    with torch.no_grad():
        assert torch.equal(loaded(x)["embedding"], old(x)["embedding"])
    # a new checkpoint records the field and round-trips with it on
    new = GeoSurge(cfg, small_hierarchy).eval()
    back = GeoSurge.from_pretrained(new.save_pretrained(tmp_path / "new")).eval()
    assert back.config.fusion.query_self_attention is True
    with torch.no_grad():
        assert torch.equal(back(x)["embedding"], new(x)["embedding"])


def test_loading_geoclip_raises_no_torch_jit_script_deprecation():
    # geoclip's own @torch.jit.script decorators warn at its import; geosurge silences exactly that warning there.
    # A fresh interpreter (geoclip may already be imported in this one), every FutureWarning turned into an error.
    import subprocess
    import sys

    code = ("from geosurge.models.head import load_geoclip_location_encoder; load_geoclip_location_encoder(); "
            "print('loaded')")
    r = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr[-2000:]
