"""What a ``--model`` value names, described without building it and loaded when needed.

Values: ``tiny`` (random weights: tests and mechanics), ``demo`` (the small model trained on the shapes set
and shipped in the package), ``base`` / ``large`` (the official EBSeg-B / EBSeg-L release from the Hugging
Face Hub, cached), or the path / fsspec URI of an ebseg or official checkpoint.

``describe_model`` is the one place that decides a model has random weights and says so (a
``RandomWeightsWarning``); jobs call it once, on the driver, before any worker loads the model with
``load_model`` / ``SegmenterSettings.load``, which stay silent.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from ebseg.build import build_ebseg, build_text_classifier
from ebseg.checkpoint import FORMAT, load, load_checked, model_from_official, read_object, to_device
from ebseg.config import BalanceConfig, ClipConfig, EBSegConfig, get_config
from ebseg.downloads import HF_FILES, WeightsUnavailableError, official_file
from ebseg.labeller import Labeller
from ebseg.modeling.text_classifier import TextClassifier
from ebseg.official import (
    convert_official_state_dict,
    infer_official_preset,
    is_official_state_dict,
    unwrap_state_dict,
)
from ebseg.precision import autocast_dtype
from ebseg.predictor import Segmenter
from ebseg.vocab import BENCHMARKS, Vocabulary

# The project's own small model, trained on the synthetic shapes set and shipped with the package.
DEMO_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "demo.pt")
RANDOM_PRESETS = ("tiny",)  # presets whose only weights are random: mechanics and tests
# Random-weight presets are built under this seed, so every actor (and every resumed run) has the same model.
RANDOM_SEED = 0
MAX_LONG_SIDE = 2560  # Segmenter's default cap on the resized long side


class RandomWeightsWarning(UserWarning):
    """A model with random weights was asked for: its labels are meaningless."""


@dataclass(frozen=True)
class ModelInfo:
    """What a job's driver needs to know about a ``--model`` value.

    model_id: stable id written into every record: ``tiny:random-seed0``, ``base:official`` (the released
    EBSeg-B), or ``<preset>:sha256-<16 hex of the checkpoint file>`` for demo and checkpoint paths.
    short_side / max_long_side: the resize the decode stage applies (``Segmenter.input_shape``).
    context_length: tokens the text tower takes per prompt (a longer class name would be cut).
    vocabulary: the vocabulary the checkpoint was trained on (``Vocabulary.to_dict`` form, as ``ebseg
    train`` and the demo checkpoint store it), or None when the model carries none.
    """

    spec: str
    model_id: str
    preset: str
    short_side: int | None
    max_long_side: int = MAX_LONG_SIDE
    random_weights: bool = False
    vocabulary: Mapping | None = None
    context_length: int = ClipConfig.context_length

    def resolve_vocabulary(self, value: str | Vocabulary | None) -> Vocabulary:
        """The vocabulary a job labels with: ``value`` when given, else the one the model was trained on."""
        if value is not None:
            return value if isinstance(value, Vocabulary) else Vocabulary.parse(value)
        if self.vocabulary is None:
            raise VocabularyRequiredError(
                f"model {self.spec!r} carries no vocabulary: give one with --vocabulary (a benchmark: "
                f"{', '.join(BENCHMARKS)}; a vocabulary file, e.g. vocabulary.json; or names: 'cat,dog,tree')"
            )
        return Vocabulary.from_dict(self.vocabulary)


class VocabularyRequiredError(ValueError):
    """No vocabulary was given and the model does not carry the one it was trained on."""


def _checkpoint_config(uri: str) -> tuple[EBSegConfig, str, Mapping | None]:
    """The config a checkpoint file holds (ebseg or official format), the sha256 of its bytes and the
    vocabulary it was trained on (ebseg checkpoints written with one; None otherwise)."""
    digest = hashlib.sha256()
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"model: no checkpoint at {uri!r} (give tiny, demo, base, large or a path)")
    if isinstance(fs, LocalFileSystem):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        # mmap: reading the config does not page the weights in.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    else:
        data = fs.cat_file(path)
        digest.update(data)
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        vocabulary = obj.get("vocabulary")
        vocabulary = dict(vocabulary) if isinstance(vocabulary, Mapping) else None
        return EBSegConfig.from_dict(obj["config"]), digest.hexdigest(), vocabulary
    return get_config(infer_official_preset(unwrap_state_dict(obj))), digest.hexdigest(), None


def describe_model(spec: str) -> ModelInfo:
    """The id and inference scale of the model ``spec`` names; warns when its weights are random.

    Presets are described from their config; demo and checkpoint files are hashed and their config read
    (memory-mapped for local files), so the caller never builds the model.
    """
    if spec in RANDOM_PRESETS:
        warnings.warn(
            f"model {spec!r} has random weights: its labels mean nothing (tests and mechanics only); "
            "use demo, base, large or a checkpoint",
            RandomWeightsWarning,
            stacklevel=2,
        )
        config = get_config(spec)
        return ModelInfo(
            spec,
            f"{spec}:random-seed{RANDOM_SEED}",
            spec,
            config.short_side,
            random_weights=True,
            context_length=config.clip.context_length,
        )
    if spec in HF_FILES:
        config = get_config(spec)
        return ModelInfo(
            spec, f"{spec}:official", spec, config.short_side, context_length=config.clip.context_length
        )
    config, sha, vocabulary = _checkpoint_config(DEMO_WEIGHTS if spec == "demo" else spec)
    model_id = f"{config.name}:sha256-{sha[:16]}"
    return ModelInfo(
        spec,
        model_id,
        config.name,
        config.short_side,
        vocabulary=vocabulary,
        context_length=config.clip.context_length,
    )


def load_official(
    uri: str | None = None, *, preset: str | None = None, map_location="cpu", strict: bool = True
) -> nn.Module:
    """An EBSeg model with the released weights.

    uri: an official ``EBSeg_base.pth`` / ``EBSeg_large.pth`` (path or fsspec URI); without one the file for
    ``preset`` (default ``"base"``) comes from the Hugging Face Hub (``slonetime/EBSeg``, cached by the hub).
    With a uri the preset is read from the file; a ``preset`` that disagrees raises.
    """
    if preset is not None and preset not in HF_FILES:
        raise ValueError(f"official EBSeg weights exist for presets {sorted(HF_FILES)}, not {preset!r}")
    if uri is None:
        uri = official_file(preset or "base")
    obj = read_object(uri, map_location)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        raise ValueError(f"{uri} is an ebseg checkpoint, not an official one: use ebseg.checkpoint.load")
    state = unwrap_state_dict(obj)
    if not is_official_state_dict(state):
        raise ValueError(f"{uri} is not an official EBSeg checkpoint (no sem_seg_head.* / clip_* keys)")
    return to_device(model_from_official(state, preset, strict=strict, uri=uri), map_location)


def load_model(spec: str, *, map_location="cpu") -> nn.Module:
    """The model a ``--model`` value names (see the module docstring); ``tiny`` is built under the current
    torch seed (``SegmenterSettings.load`` fixes it); silent on random weights: ``describe_model`` says it."""
    if spec in RANDOM_PRESETS:
        return to_device(build_ebseg(get_config(spec)), map_location)
    if spec == "demo":
        if not os.path.exists(DEMO_WEIGHTS):
            raise WeightsUnavailableError(
                f"the demo weights are missing from this installation ({DEMO_WEIGHTS}); reinstall ebseg, "
                "or pass --model tiny (random weights), base, large or a checkpoint path"
            )
        return load(DEMO_WEIGHTS, map_location=map_location)
    if spec in HF_FILES:
        return load_official(preset=spec, map_location=map_location)
    return load(spec, map_location=map_location)


@dataclass(frozen=True)
class SegmenterSettings:
    """How a worker builds its ``Segmenter``: the model a ``--model`` value names, the vocabulary, the batch
    size, the device, autocast (``amp_dtype``: bf16 / fp16 / fp32, applied only on CUDA), torch threads and
    ``compile`` (``torch.compile`` the model, see ``Segmenter``).
    Small and picklable: Ray ships it to every actor, which calls :meth:`load` once."""

    model: str
    vocabulary: Vocabulary
    batch_size: int = 4
    device: str = "cpu"
    amp_dtype: str | None = None
    num_threads: int | None = None
    compile: bool = False

    def load_labeller(self) -> Labeller:
        """Only what labelling stored proposals needs: the text tower (``load_text_tower``, no image
        towers) and the vocabulary, encoded now. The same embeddings as ``load().labeller``'s."""
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        tower = load_text_tower(self, map_location=self.device)
        labeller = Labeller(tower.classifier, tower.balance, self.vocabulary, device=self.device)
        labeller.class_embeddings()
        return labeller

    def load(self) -> Segmenter:
        """The Segmenter, with the vocabulary encoded. Random-weight presets are built under ``RANDOM_SEED``:
        every worker and every resume has the same weights."""
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        torch.manual_seed(RANDOM_SEED)  # only random-weight presets depend on it
        network = load_model(self.model, map_location=self.device)
        autocast = autocast_dtype(self.amp_dtype) if torch.device(self.device).type == "cuda" else None
        segmenter = Segmenter(
            network,
            self.vocabulary,
            batch_size=self.batch_size,
            device=self.device,
            amp_dtype=autocast,
            compile=self.compile,
        )
        segmenter.class_embeddings()  # encode the vocabulary now, not inside the first batch's time
        return segmenter


TEXT_PREFIX = "text."


@dataclass
class TextTower:
    """What scoring a text needs from a model: its text classifier (frozen, eval mode) and its balancing."""

    classifier: TextClassifier
    balance: BalanceConfig
    model: str  # the ``--model`` value it was loaded from


def _checkpoint_text(uri: str, map_location) -> tuple[EBSegConfig, dict[str, torch.Tensor]]:
    """The config and the text tower's entries (``text.`` removed) of an ebseg or official checkpoint."""
    obj = read_object(uri, map_location)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        config, state = EBSegConfig.from_dict(obj["config"]), obj["state_dict"]
    else:
        official = unwrap_state_dict(obj)
        config, state = get_config(infer_official_preset(official)), convert_official_state_dict(official)
    text = {k[len(TEXT_PREFIX) :]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    return config, text


def load_text_tower(model: str | SegmenterSettings, *, map_location: str = "cpu") -> TextTower:
    """The text tower of the model a ``--model`` value (or a worker's ``SegmenterSettings``) names.

    Checkpoints (demo, base, large, paths) are read once and only the text tower is built; its entries
    must fit exactly (``CheckpointMismatchError`` otherwise). ``tiny`` has random weights drawn while
    building the whole model, so it is built whole (small) under ``RANDOM_SEED``, as workers build it.
    """
    spec = model.model if isinstance(model, SegmenterSettings) else model
    if spec in RANDOM_PRESETS:
        torch.manual_seed(RANDOM_SEED)
        network = load_model(spec, map_location=map_location)
        text, balance = network.text, network.config.balance
    else:
        uri = DEMO_WEIGHTS if spec == "demo" else official_file(spec) if spec in HF_FILES else spec
        config, state = _checkpoint_text(uri, map_location)
        text, balance = build_text_classifier(config.clip), config.balance
        load_checked(text, state, text.state_dict(), strict=True, what=f"{uri} (text tower)")
        text.to(map_location)
    # Frozen as in EBSeg: attention takes another (bitwise different) path for parameters needing grads.
    return TextTower(classifier=text.eval().requires_grad_(False), balance=balance, model=spec)
