"""Checkpoint files: fsspec IO, strict loading, ebseg and official files loaded into the real models."""

from __future__ import annotations

import os

import fsspec
import pytest
import torch

from ebseg import checkpoint
from ebseg.build import build_ebseg
from ebseg.checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    convert_official_state_dict,
    load,
    load_into,
    read_state,
    save,
)
from ebseg.config import get_config
from ebseg.zoo import load_official
from tests.ebseg.weights_support import (
    REC_START,
    Toy,
    assert_same_state,
    module_with,
    official_state,
)

# ----------------------------------------------------------------------------------------------------------
# IO helpers and strict loading, on small stand-in models


@pytest.mark.parametrize("where", ["local", "file", "memory"])
def test_save_read_round_trip(where, tmp_path):
    uri = {
        "local": str(tmp_path / "sub" / "toy.pt"),
        "file": (tmp_path / "toy.pt").as_uri(),
        "memory": f"memory://ckpt-test/{tmp_path.name}/toy.pt",
    }[where]
    model = Toy(get_config("tiny"))
    save(model, uri, extra={"step": 7, "metrics": {"miou": 0.5}})

    with fsspec.open(uri, "rb") as f:
        raw = torch.load(f, weights_only=True)
    assert raw["format"] == "ebseg" and raw["version"] == 1
    assert raw["config"] == get_config("tiny").to_dict()
    assert raw["step"] == 7 and raw["metrics"] == {"miou": 0.5}
    assert "cache" not in raw["state_dict"]

    fresh = Toy(get_config("tiny"))
    report = load_into(fresh, read_state(uri))
    assert report.ok and report.loaded == 5  # clip.{weight,bias}, text.{weight,bias}, scale
    assert_same_state(model, fresh)
    if where == "local":
        assert os.listdir(tmp_path / "sub") == ["toy.pt"]  # no temporary file left behind


def test_save_refuses_extra_overriding_entries(tmp_path):
    with pytest.raises(ValueError, match="config"):
        save(Toy(get_config("tiny")), str(tmp_path / "x.pt"), extra={"config": {}})


def test_load_into_strict_lists_problems():
    model = Toy(get_config("tiny"))
    state = dict(model.state_dict())
    del state["clip.bias"]
    state["clip.weight"] = torch.zeros(5, 3)
    state["extra.thing"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(model, state)
    message = str(info.value)
    assert "1 missing: ['clip.bias']" in message
    assert "1 unexpected: ['extra.thing']" in message
    assert "('clip.weight', (4, 3), (5, 3))" in message


def test_load_into_non_strict_loads_what_matches():
    model = Toy(get_config("tiny"))
    target = Toy(get_config("tiny"))
    state = dict(model.state_dict())
    del state["clip.bias"]
    state["text.weight"] = torch.zeros(7)
    state["extra.thing"] = torch.zeros(1)
    before = target.clip.bias.detach().clone()
    report = load_into(target, state, strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    assert report.missing == ["clip.bias"]
    assert report.unexpected == ["extra.thing"]
    assert report.mismatched == [("text.weight", (4,), (7,))]
    assert torch.equal(target.clip.weight, model.clip.weight)
    assert torch.equal(target.clip.bias, before)


def test_long_lists_are_cut_with_a_count():
    model = module_with({f"p{i}": (1,) for i in range(25)})
    with pytest.raises(CheckpointMismatchError, match=r"25 missing: \[.*\] \(and 15 more\)"):
        load_into(model, {})


@pytest.fixture
def fake_builder(monkeypatch):
    """Stands in for build_ebseg so that ``load`` can be tested on Toy models; records the configs."""
    built = []

    def build_ebseg(config):
        built.append(config)
        return Toy(config)

    monkeypatch.setattr(checkpoint, "build_ebseg", build_ebseg)
    return built


def test_load_rebuilds_from_the_stored_config(fake_builder, tmp_path):
    config = get_config("tiny").replace(short_side=96)
    model = Toy(config)
    uri = f"memory://ckpt-test/{tmp_path.name}/toy.pt"
    save(model, uri)
    loaded = load(uri)
    assert isinstance(loaded, Toy)
    assert_same_state(model, loaded)
    assert loaded.config == config == fake_builder[0]  # built from the config as saved


def test_load_reads_configs_that_named_weight_sources(fake_builder, tmp_path):
    """Configs once held ``clip.pretrained`` / ``sam.checkpoint``; a checkpoint saved then (the shipped demo
    among them) loads its own weights and fetches nothing."""
    model = Toy(get_config("tiny"))
    config = model.config.to_dict()
    config["clip"]["pretrained"] = "openai"
    config["sam"]["checkpoint"] = "s3://nowhere/sam.pth"
    path = tmp_path / "old.pt"
    torch.save({"format": "ebseg", "version": 1, "config": config, "state_dict": model.state_dict()}, path)
    loaded = load(str(path))
    assert loaded.config == get_config("tiny")
    assert_same_state(model, loaded)


def test_load_refuses_other_files(fake_builder, tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(Toy(get_config("tiny")).state_dict(), path)
    with pytest.raises(ValueError, match="carries no config"):
        load(str(path))
    torch.save({"format": "ebseg", "version": 99, "config": {}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="version 99"):
        load(str(path))
    assert fake_builder == []


class NotATensor:
    pass


def test_read_state_refuses_pickled_objects(tmp_path):
    path = tmp_path / "d2.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "scheduler": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*\['model'\]") as info:
        read_state(str(path))
    assert info.value.__cause__ is None


def test_read_state_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state(str(tmp_path / "nope.pt"))


# ----------------------------------------------------------------------------------------------------------
# The real models


@pytest.mark.parametrize("preset", ["base", "large"])
def test_official_checkpoint_fits_the_model(preset):
    official = official_state(preset)
    model = build_ebseg(get_config(preset))
    report = load_into(model, convert_official_state_dict(official))
    assert report.ok, report.describe()
    state = model.state_dict()
    r = REC_START[preset]
    assert torch.all(
        state[f"clip.resblocks.{r}.attn.in_proj_bias"] == official["clip_rec_head.resblocks.0.attn.qkv.bias"]
    )
    assert torch.all(state["fusion.1.proj.weight"] == official["sem_seg_head.clip_fusion_layers.1.1.weight"])


def test_load_reads_an_official_file():
    official = official_state("base")
    uri = "memory://ckpt-test/official/EBSeg_base.pth"
    with fsspec.open(uri, "wb") as f:  # zero-stride tensors keep this file small
        torch.save({"model": official, "iteration": 80000}, f)
    model = load(uri)
    assert model.config.name == "base"
    assert torch.all(
        model.state_dict()["decoder.bias_scaling.weight"]
        == official["sem_seg_head.predictor.bias_scaling.weight"]
    )
    with pytest.raises(ValueError, match="EBSeg-base"):
        load_official(uri, preset="large")


def test_tiny_round_trip(tmp_path):
    model = build_ebseg(get_config("tiny"))
    path = str(tmp_path / "tiny.pt")
    save(model, path, extra={"step": 1})
    loaded = load(path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert_same_state(model, loaded)


def test_checkpoint_reexports_the_converter():
    assert checkpoint.convert_official_state_dict is convert_official_state_dict
