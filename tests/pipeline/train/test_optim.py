"""Optimiser recipe: which parameters decay, which are trained, and the poly learning rate."""

from __future__ import annotations

import io

import pytest
import torch

from ebseg.build import build_ebseg
from pipeline.train import optim


@pytest.fixture(scope="module")
def model():
    return build_ebseg("tiny")


def _groups(model) -> dict[str, set[str]]:
    return {g["name"]: set(g["param_names"]) for g in optim.param_groups(model, weight_decay=0.05)}


def test_reference_policy_groups(model):
    optim.set_trainable(model, "reference")
    groups = _groups(model)
    decay, no_decay = groups["decay"], groups["no_decay"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    # Frozen encoders stay out; their positional embeddings are in, without decay.
    assert not any(
        n.startswith(("clip.", "sam.", "text."))
        for n in trainable - {"clip.positional_embedding", "sam.pos_embed", "text.bg_embed"}
    )
    assert {"clip.positional_embedding", "sam.pos_embed"} <= no_decay
    # nn.Embedding and torch norm modules: no decay.
    embeddings = {"decoder.query_embed.weight", "decoder.query_feat.weight", "decoder.level_embed.weight"}
    assert embeddings <= no_decay
    assert {"decoder.decoder_norm.weight", "decoder.decoder_norm.bias"} <= no_decay
    assert "pixel_decoder.adapter_1.norm.weight" in no_decay  # GroupNorm inside a conv
    # The exact no-decay set: torch norm modules, nn.Embedding, and the two positional embeddings.
    by_type = {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding))
        for name, p in module.named_parameters(recurse=False)
        if p.requires_grad
    }
    assert no_decay == by_type | {"clip.positional_embedding", "sam.pos_embed"}
    assert "pixel_decoder.input_proj.0.1.weight" in no_decay  # a GroupNorm inside a Sequential
    # What the reference decays although it looks like a norm or an embedding.
    assert {
        "text.bg_embed",
        "decoder.logit_scale",
        "decoder.bias_scaling.weight",
        "pixel_decoder.transformer.level_embed",
        "fusion.0.norm.weight",  # custom channel LayerNorm: not a torch norm type
        "pixel_decoder.adapter_1.weight",
        "decoder.mask_embed.layers.0.bias",
    } <= decay


def test_all_policy_trains_encoders_but_not_the_text_encoder(model):
    try:
        optim.set_trainable(model, "all")
        groups = _groups(model)
        names = groups["decay"] | groups["no_decay"]
        assert "clip.resblocks.0.attn.in_proj_weight" in names
        assert any(n.startswith("sam.blocks.") for n in names)
        assert "text.logit_scale" in names and "text.bg_embed" in names
        assert not any(n.startswith(("text.transformer.", "text.token_embedding")) for n in names)
        assert "text.positional_embedding" not in names
        # Same decay rules apply inside the encoders.
        assert "clip.ln_pre.weight" in groups["no_decay"]
        assert "clip.class_embedding" in groups["decay"]
    finally:
        optim.set_trainable(model, "reference")
    with pytest.raises(ValueError, match="trainable"):
        optim.set_trainable(model, "some")


def test_poly_schedule_matches_the_formula_and_survives_a_state_round_trip(model):
    optimizer = optim.build_optimizer(model, lr=1e-4, weight_decay=0.05)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    scheduler = optim.build_scheduler(optimizer, max_steps=10, power=0.9)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-4 * (1 - k / 10) ** 0.9 for k in range(10)]
    assert seen == pytest.approx(expected, rel=1e-9)
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert optim.poly_lr(1e-4, 3, max_steps=10) == pytest.approx(expected[3])

    # A restored scheduler continues where the saved one stopped (weights_only load, as checkpoints do).
    optimizer = optim.build_optimizer(model, lr=1e-4, weight_decay=0.05)
    scheduler = optim.build_scheduler(optimizer, max_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    optimizer2 = optim.build_optimizer(model, lr=1e-4, weight_decay=0.05)
    scheduler2 = optim.build_scheduler(optimizer2, max_steps=10)
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])
    assert scheduler2.last_epoch == 4
    assert optimizer2.param_groups[1]["lr"] == pytest.approx(expected[4])


def test_clipping_bounds_the_joint_norm():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.full((3,), 2.0)
    params[1].grad = torch.full((4,), -1.0)
    before = optim.clip_gradients(params, 0.01)
    assert float(before) == pytest.approx((3 * 4 + 4) ** 0.5)
    after = torch.cat([p.grad for p in params]).norm()
    assert float(after) == pytest.approx(0.01, rel=1e-4)
    assert optim.clip_gradients(params, None) is None
