"""``--model`` values (``ebseg.zoo``): every kind of weights, the official release offline, random weights."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from ebseg import checkpoint, zoo
from ebseg.build import build_ebseg
from ebseg.config import get_config
from ebseg.downloads import WeightsUnavailableError
from ebseg.zoo import load_official
from tests.ebseg.weights_support import (
    assert_actionable,
)


def test_load_official_offline_fails_fast_with_a_fix(offline_hub):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_official(preset="large")
    assert time.monotonic() - start < 10
    assert_actionable(
        info.value, "EBSeg_large.pth", "load_official('/path/to/EBSeg_large.pth')", "HF_ENDPOINT"
    )


def test_load_official_rejects_unreleased_presets():
    with pytest.raises(ValueError, match="tiny"):
        load_official(preset="tiny")


def test_load_model_names_every_kind_of_weights(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading says nothing: describe_model is the one place that warns
        tiny = zoo.load_model("tiny")
    assert tiny.config.name == "tiny"
    path = str(tmp_path / "m.pt")
    checkpoint.save(tiny, path)
    assert zoo.load_model(path).config == tiny.config
    monkeypatch.setattr(zoo, "DEMO_WEIGHTS", str(tmp_path / "absent.pt"))
    with pytest.raises(WeightsUnavailableError, match="demo weights are missing"):
        zoo.load_model("demo")
    monkeypatch.setattr(zoo, "DEMO_WEIGHTS", path)
    assert zoo.load_model("demo").config == tiny.config


def test_describe_model_says_random_weights_once(tmp_path):
    with pytest.warns(zoo.RandomWeightsWarning, match="random weights") as caught:
        info = zoo.describe_model("tiny")
    assert len(caught) == 1 and info.random_weights and info.model_id == "tiny:random-seed0"
    path = str(tmp_path / "m.pt")
    checkpoint.save(zoo.load_model("tiny"), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        described = zoo.describe_model(path)
    assert not described.random_weights and described.model_id.startswith("tiny:sha256-")


def save_tiny(path, *, seed=0, short_side=64) -> str:
    """A tiny-preset checkpoint whose inference scale is ``short_side``."""
    torch.manual_seed(seed)
    checkpoint.save(build_ebseg(get_config("tiny").replace(short_side=short_side)), str(path))
    return str(path)


def test_describe_model(tmp_path):
    tiny_ckpt = save_tiny(tmp_path / "tiny.pt")
    with pytest.warns(zoo.RandomWeightsWarning):
        info = zoo.describe_model("tiny")
    assert info.model_id == "tiny:random-seed0" and info.short_side == 640
    assert zoo.describe_model("base").model_id == "base:official"  # no download: the preset describes it

    a = zoo.describe_model(tiny_ckpt)
    assert a.preset == "tiny" and a.short_side == 64 and a.model_id.startswith("tiny:sha256-")
    assert zoo.describe_model(tiny_ckpt) == a  # content-addressed: stable
    other = zoo.describe_model(save_tiny(tmp_path / "other.pt", seed=1))
    assert other.model_id != a.model_id
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt"):
        zoo.describe_model(str(tmp_path / "nothing.pt"))


def test_a_model_labels_with_the_vocabulary_it_carries(tmp_path):
    from ebseg.data.shapes import SHAPES_CLASSES
    from ebseg.vocab import Vocabulary

    demo = zoo.describe_model("demo").resolve_vocabulary(None)
    assert list(demo.names) == list(SHAPES_CLASSES)
    # What `ebseg train` writes beside the weights is read back without building the model.
    trained = Vocabulary.parse("cat,dog,tree")
    path = str(tmp_path / "final.pt")
    torch.manual_seed(0)
    checkpoint.save(build_ebseg(get_config("tiny")), path, extra={"vocabulary": trained.to_dict()})
    assert zoo.describe_model(path).resolve_vocabulary(None).id == trained.id
    assert zoo.describe_model(path).resolve_vocabulary("voc20").name == "voc20"  # a given one wins
    # Models without one (random presets, official releases, bare checkpoints) name the accepted forms.
    for info in (zoo.describe_model("base"), zoo.describe_model(save_tiny(tmp_path / "bare.pt"))):
        with pytest.raises(zoo.VocabularyRequiredError, match=r"--vocabulary .*ade150.*'cat,dog,tree'"):
            info.resolve_vocabulary(None)


@pytest.mark.parametrize("kind", ["tiny", "demo", "checkpoint"])
def test_a_labeller_from_the_text_tower_alone_labels_as_the_whole_model(kind, photos, tmp_path):
    """What relabelling workers load (``load_labeller``: the text tower, no image towers) gives the
    whole model's class embeddings and labels, bit for bit, for random presets, the shipped model and a
    checkpoint file."""
    from ebseg.vocab import Vocabulary

    spec = save_tiny(tmp_path / "tiny.pt", seed=3) if kind == "checkpoint" else kind
    settings = zoo.SegmenterSettings(model=spec, vocabulary=Vocabulary.parse("person,cat,sky,coffee cup"))
    segmenter = settings.load()
    labeller = settings.load_labeller()
    assert torch.equal(labeller.class_embeddings(), segmenter.class_embeddings())
    image = photos[1][::4, ::4].copy()
    proposals = segmenter.propose([image])
    [fresh] = segmenter.label(proposals, [image.shape[:2]])
    [again] = labeller.label(proposals, [image.shape[:2]])
    assert (fresh.label_map == again.label_map).all()
    assert (fresh.scores == again.scores).all()
