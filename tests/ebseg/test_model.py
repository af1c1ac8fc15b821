"""The model on the tiny preset: shapes at every stage, the freezing policy, determinism, training."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from ebseg.build import build_ebseg
from ebseg.checkpoint import convert_official_state_dict
from ebseg.config import PRESETS, EBSegConfig, get_config, tiny
from ebseg.modeling.rec_head import AttnBias, build_rec_attn_bias


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_ebseg("tiny").eval()


def class_embeddings(k: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return F.normalize(torch.randn(k, dim, generator=g), dim=-1)


def images(b: int = 2, h: int = 256, w: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def test_stage_shapes_and_dtypes(model):
    cfg = model.config
    x = images(2, 256, 192)
    with torch.inference_mode():
        clip_in, sam_in = model._normalise(x, None)
        clip_in = F.interpolate(clip_in, scale_factor=cfg.clip.input_scale, mode="bilinear")
        feats = model.clip.extract(clip_in, dual=True)
        grid = (128 // 16, 96 // 16)
        assert set(feats.maps) == set(range(cfg.clip.rec_head_start + 1))
        assert feats.maps[cfg.clip.rec_head_start].shape == (2, cfg.clip.width, *grid)
        assert feats.cls[0].shape == (2, cfg.clip.width)
        assert feats.surgery.shape == (2, 1 + grid[0] * grid[1], cfg.clip.width)
        plain = model.clip.extract(clip_in, dual=False)
        assert plain.surgery is None
        # The original stream (what is saved per layer) is the same with or without the surgery stream.
        for i in plain.maps:
            torch.testing.assert_close(plain.maps[i], feats.maps[i])

        sam = model.sam(sam_in)
        for name, stride in zip(("res2", "res3", "res4", "res5"), (16, 8, 16, 32)):
            assert sam[name].shape == (2, cfg.sam.embed_dim, 256 // stride, 192 // stride)
            assert sam[name].dtype == torch.float32

        mask_features, multi = model.pixel_decoder(sam)
        assert mask_features.shape == (2, cfg.pixel_decoder.mask_dim, 64, 48)
        assert [m.shape[-2:] for m in multi] == [(8, 6), (16, 12), (32, 24)]

        dec = model.decoder(multi, mask_features)
        q = cfg.decoder.num_queries
        assert len(dec.pred_masks) == cfg.decoder.num_layers + 1
        assert dec.pred_masks[-1].shape == (2, q, 64, 48)
        assert dec.embeddings[-1].shape == (2, q, cfg.clip.embed_dim)
        assert dec.attn_hidden.shape == (2, 64, 48, cfg.pixel_decoder.mask_dim)
        bias = model.decoder.attn_bias(dec.mask_embeds[-1], dec.attn_hidden)
        assert bias.dense().shape == (2, cfg.clip.heads, q, 64, 48)
        # The folded computation equals the definition: bias_scaling(<mask_embed, attn_proj(pixel)[head]>).
        per_pixel = model.decoder.attn_proj(mask_features.permute(0, 2, 3, 1))  # [B, h, w, heads * c]
        per_pixel = per_pixel.unflatten(-1, (cfg.clip.heads, -1))
        direct = torch.einsum("bqc,bhwnc->bnqhw", dec.mask_embeds[-1], per_pixel)
        direct = model.decoder.bias_scaling(direct.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(bias.dense(), direct, atol=1e-5 * direct.abs().max().item(), rtol=1e-5)
        # The offset is added after the head's max pooling; a constant commutes with a max, bit for bit.
        pooled = build_rec_attn_bias(bias, grid=grid, num_heads=cfg.clip.heads)
        dense = AttnBias(bias.dense(), torch.zeros_like(bias.offset))
        assert torch.equal(pooled, build_rec_attn_bias(dense, grid=grid, num_heads=cfg.clip.heads))

        emb_b, dense = model.clip.recognize(feats, bias, num_sos=q)
        assert emb_b.shape == (2, q, cfg.clip.embed_dim)
        torch.testing.assert_close(emb_b.norm(dim=-1), torch.ones(2, q))
        assert dense.shape == (2, cfg.clip.embed_dim, *grid)

        out = model(x, class_embeddings(5, cfg.clip.embed_dim))
    assert out.logits_a[-1].shape == out.logits_b[-1].shape == out.logits_d.shape == (2, q, 6)
    assert len(out.logits_a) == cfg.decoder.num_layers + 1 and len(out.logits_b) == 1
    assert all(t.dtype == torch.float32 for t in (out.logits_a[-1], out.logits_b[-1], out.logits_d))


def test_recognition_head_runs_once_at_inference_and_per_layer_in_training(model):
    emb = class_embeddings(3, model.config.clip.embed_dim)
    with mock.patch.object(model.clip, "recognize", wraps=model.clip.recognize) as spy:
        with torch.inference_mode():
            model(images(1), emb)
        assert spy.call_count == 1
        model.train()
        try:
            out = model(images(1), emb)
        finally:
            model.eval()
        assert spy.call_count == 1 + model.config.decoder.num_layers + 1
    assert out.logits_d is None and len(out.logits_b) == len(out.logits_a)


def test_final_only_gives_the_full_paths_final_prediction(model):
    """Inference (``Segmenter``) asks for the final prediction alone; it is the full path's last entry, bit
    for bit, although the intermediate predictions' heads are skipped."""
    emb = class_embeddings(4, model.config.clip.embed_dim)
    with torch.inference_mode():
        full = model(images(), emb, image_sizes=[(256, 200), (180, 256)])
        final = model(images(), emb, image_sizes=[(256, 200), (180, 256)], final_only=True)
    assert len(full.pred_masks) == model.config.decoder.num_layers + 1
    for name in ("pred_masks", "logits_a", "logits_b", "embeddings_a"):
        assert len(getattr(final, name)) == 1, name
        assert torch.equal(getattr(final, name)[-1], getattr(full, name)[-1]), name
    for name in ("logits_d", "embeddings_b", "embeddings_d"):
        assert torch.equal(getattr(final, name), getattr(full, name)), name


def test_attention_masks_from_resized_features_equal_resized_mask_logits(model):
    """The decoder thresholds ``mask_embed . resize(features)`` instead of ``resize(mask_embed . features)``
    (the reference's order): the same logits up to float rounding, so the same mask away from 0."""
    decoder = model.decoder
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, model.config.pixel_decoder.mask_dim, 64, 48, generator=g)
    mask_embed = torch.randn(2, decoder.num_queries, features.shape[1], generator=g)
    for size in ((8, 6), (16, 12), (32, 24)):
        resized = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        blocked = decoder._attn_mask(mask_embed, resized).view(2, decoder.num_heads, decoder.num_queries, -1)
        logits = F.interpolate(
            torch.einsum("bqc,bchw->bqhw", mask_embed, features),
            size=size,
            mode="bilinear",
            align_corners=False,
        ).flatten(2)
        expected = logits.sigmoid() < 0.5
        assert blocked.any() and not blocked.all()
        for head in range(decoder.num_heads):
            decided = logits.abs() > 1e-4 * logits.abs().max()
            assert torch.equal(blocked[:, head][decided], expected[decided])


def test_outputs_are_deterministic(model):
    emb = class_embeddings(4, model.config.clip.embed_dim)
    with torch.inference_mode():
        a = model(images(), emb)
        b = model(images(), emb)
    assert torch.equal(a.logits_d, b.logits_d) and torch.equal(a.pred_masks[-1], b.pred_masks[-1])
    torch.manual_seed(0)
    again = build_ebseg("tiny")
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_padding_is_zero_in_each_normalised_space(model):
    x = torch.full((1, 3, 64, 64), 200, dtype=torch.uint8)
    clip_in, sam_in = model._normalise(x, [(40, 50)])
    assert clip_in[..., 40:, :].abs().max() == 0 and sam_in[..., :, 50:].abs().max() == 0
    assert clip_in[..., :40, :50].abs().min() > 0


TRAINABLE_OFFICIAL_PREFIXES = ("sem_seg_head.",)
TRAINABLE_OFFICIAL_NAMES = (
    "backbone.pos_embed",
    "clip_visual_extractor.positional_embedding",
    "ov_classifier.bg_embed",
)


def test_trainable_parameters_are_exactly_the_references(reference_dir):
    """The reference trains the decoder head, the two positional embeddings and the background row;
    mapped through the converter, that is exactly our set of trainable parameters."""
    entries = json.loads((reference_dir / "keys_ebseg_b.json").read_text())
    trainable = {
        e["name"]: torch.zeros(e["shape"])
        for e in entries
        if e["is_param"]
        and (e["name"].startswith(TRAINABLE_OFFICIAL_PREFIXES) or e["name"] in TRAINABLE_OFFICIAL_NAMES)
    }
    expected = set(convert_official_state_dict(trainable))
    model = build_ebseg("base")
    ours = {name for name, p in model.named_parameters() if p.requires_grad}
    assert ours == expected
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert numel == sum(t.numel() for t in trainable.values())


def test_training_backward_reaches_only_trainable_parameters():
    torch.manual_seed(0)
    model = build_ebseg("tiny").train()
    emb = class_embeddings(3, model.config.clip.embed_dim)
    out = model(images(2, 128, 128), emb)
    loss = sum(t.logsumexp(-1).mean() for t in out.logits_a + out.logits_b)
    loss = loss + sum(m.sigmoid().mean() for m in out.pred_masks)
    loss.backward()
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Deformable attention starts with zero offset/attention matrices, so nothing flows to its queries
    # (level embedding, pixel-decoder positional path) at step 0; everything else must be reached.
    unreached = trainable - reached
    assert all(n.startswith("pixel_decoder.transformer.") for n in unreached), sorted(unreached)
    must_reach = (
        "clip.positional_embedding",
        "sam.pos_embed",
        "text.bg_embed",
        "decoder.bias_scaling.weight",
    )
    assert set(must_reach) <= reached


def test_presets_and_config_round_trip():
    assert set(PRESETS) == {"tiny", "demo", "base", "large"}
    for name in PRESETS:
        cfg = get_config(name)
        assert EBSegConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert get_config("large").clip.surgery_start == 4 and get_config("base").clip.surgery_start == 2
    with pytest.raises(ValueError, match="unknown EBSeg preset"):
        get_config("huge")
    with pytest.raises(TypeError):
        EBSegConfig.from_dict({**tiny().to_dict(), "bogus": 1})


def test_compiles_as_one_graph_and_matches_eager(model):
    """``torch.compile`` traces the whole inference forward without a graph break (fullgraph) and gives the
    eager outputs. The "eager" backend checks the tracing in seconds; inductor's code generation (minutes on
    CPU) is measured by ``benchmarks/model_throughput.py --compile``."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, text = images(1, 128, 96), class_embeddings(4, model.config.clip.embed_dim)
    with torch.inference_mode():
        expected, got = model(x, text), compiled(x, text)
    for name in ("pred_masks", "logits_a", "logits_b"):
        torch.testing.assert_close(getattr(got, name)[-1], getattr(expected, name)[-1])
    torch.testing.assert_close(got.logits_d, expected.logits_d)
