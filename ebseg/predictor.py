"""``Segmenter``: uint8 RGB images of any size in, label maps at their original size out.

It owns everything stateful around the pure model: resizing, per-image padding, batching, device and
autocast; its ``Labeller`` (``ebseg.labeller``) holds the vocabulary's cached text embeddings and the
post-processing of the reference (balancing of the three class sources, mask upsampling, crop, resize to
the original size, semantic inference), so ``predict`` is ``label(propose(...))``.

Each image is padded on its own to a multiple of 32 and only images of equal padded size share a batch,
so an image's result does not depend on its batch neighbours (the reference pads a batch to its largest
image, but its published numbers are at one image per GPU).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from ebseg.labeller import Labeller, Prediction
from ebseg.model import EBSeg
from ebseg.proposals import Proposals
from ebseg.resize import resize_image, resized_shape
from ebseg.vocab import Vocabulary


def _check_image(image: object) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {desc}")


class Segmenter:
    """Open-vocabulary semantic segmentation with an EBSeg model.

    short_side: resize each image so its short side has this length before the model; "model" (default)
    takes the model config's (640 for base and large, as in the paper); None runs at the input size.
    device: "cuda", "cpu", ... (default: CUDA when available).
    amp_dtype: torch.bfloat16 / torch.float16 to run the model under autocast (GPU), None for float32.
    compile: wrap the model in ``torch.compile`` (opt-in: compiling takes a while on the first batch and
    again for each new padded input size; ``self.model`` then forwards attribute access to the model).
    """

    def __init__(
        self,
        model: EBSeg,
        vocabulary: Vocabulary | Sequence[str],
        *,
        short_side: int | str | None = "model",
        max_long_side: int = 2560,
        batch_size: int = 4,
        device: str | torch.device | None = None,
        amp_dtype: torch.dtype | None = None,
        compile: bool = False,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if compile:
            self.model = torch.compile(self.model)
        self.short_side = model.config.short_side if short_side == "model" else short_side
        self.max_long_side = max_long_side
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        # Everything after the forward pass that depends on the vocabulary.
        self.labeller = Labeller(model.text, model.config.balance, vocabulary, device=self.device)

    @property
    def vocabulary(self) -> Vocabulary:
        return self.labeller.vocabulary

    @vocabulary.setter
    def vocabulary(self, vocabulary: Vocabulary | Sequence[str]) -> None:
        self.labeller.vocabulary = vocabulary

    def class_embeddings(self) -> torch.Tensor:
        """[K, D] text embeddings of the current vocabulary, computed once per vocabulary."""
        return self.labeller.class_embeddings()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) an original of ``height`` x ``width`` is resized to before the model."""
        if self.short_side is None:
            return height, width
        return resized_shape(height, width, self.short_side, self.max_long_side)

    def padded_shape(self, height: int, width: int) -> tuple[int, int]:
        """The padded (h, w) the model runs an original of ``height`` x ``width`` at: images of equal padded
        shape share a forward pass (``predict``), and an image's result does not depend on its neighbours."""
        h, w = self.input_shape(height, width)
        div = self.model.config.size_divisibility
        return math.ceil(h / div) * div, math.ceil(w / div) * div

    def _prepare(self, image: np.ndarray, original: tuple[int, int]) -> torch.Tensor:
        """(H, W, 3) uint8 -> [3, h, w] uint8 tensor at the model input size of an ``original``-sized image.

        An image that is already at that size (resized by a decode stage elsewhere) is used as it is.
        """
        image = resize_image(image, self.input_shape(*original))
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # copies: inputs may be read-only

    def propose(
        self, images: Sequence[np.ndarray], *, output_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[Proposals]:
        """Vocabulary-free model outputs (``ebseg.proposals``) for (H, W, 3) uint8 RGB arrays of any sizes.

        output_sizes: as in ``predict`` (only the model input size depends on it).
        """
        return self._propose(images, self._checked_sizes(images, output_sizes))

    def _propose(self, images: Sequence[np.ndarray], output_sizes: list[tuple[int, int]]) -> list[Proposals]:
        """``propose`` on images and output sizes already checked by ``_checked_sizes``."""
        prepared = [self._prepare(im, size) for im, size in zip(images, output_sizes)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(output_sizes):
            groups.setdefault(self.padded_shape(*size), []).append(i)

        # The forward needs some class embeddings; its vocabulary-free outputs do not depend on them.
        text = self.class_embeddings()
        results: list[Proposals | None] = [None] * len(images)
        for (ph, pw), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.zeros(len(chunk), 3, ph, pw, dtype=torch.uint8)
                sizes = []
                for j, i in enumerate(chunk):
                    _, h, w = prepared[i].shape
                    batch[j, :, :h, :w] = prepared[i]
                    sizes.append((h, w))
                with torch.inference_mode(), self._autocast():
                    # Only the final prediction is read: the decoder skips the intermediate ones' heads.
                    out = self.model(batch.to(self.device), text, image_sizes=sizes, final_only=True)
                embeddings = torch.stack([out.embeddings_a[-1], out.embeddings_b, out.embeddings_d], dim=1)
                for j, i in enumerate(chunk):
                    results[i] = Proposals(
                        masks=out.pred_masks[-1][j].float(),
                        embeddings=embeddings[j].float(),
                        input_size=sizes[j],
                    )
        return results  # type: ignore[return-value]

    def label(
        self,
        proposals: Sequence[Proposals],
        output_sizes: Sequence[tuple[int, int]],
        *,
        return_probabilities: bool = False,
    ) -> list[Prediction]:
        """Label each image's proposals with the current vocabulary at its (height, width) output size
        (``Labeller.label``)."""
        return self.labeller.label(proposals, output_sizes, return_probabilities=return_probabilities)

    def _checked_sizes(
        self, images: Sequence[np.ndarray], output_sizes: Sequence[tuple[int, int]] | None
    ) -> list[tuple[int, int]]:
        """Refuse anything but (H, W, 3) uint8 arrays; each image's output (height, width)."""
        for image in images:
            _check_image(image)
        if output_sizes is None:
            output_sizes = [image.shape[:2] for image in images]
        if len(output_sizes) != len(images):
            raise ValueError(f"{len(output_sizes)} output sizes for {len(images)} images")
        return [(int(h), int(w)) for h, w in output_sizes]

    def predict(
        self,
        images: Sequence[np.ndarray],
        *,
        output_sizes: Sequence[tuple[int, int]] | None = None,
        return_probabilities: bool = False,
    ) -> list[Prediction]:
        """Segment a batch of (H, W, 3) uint8 RGB arrays of any sizes; one Prediction per image.

        output_sizes: per image, the (height, width) of the original it was made from, when a caller has
        already resized it (``resize_image(image, segmenter.input_shape(height, width))``): results come
        at that size, exactly as if the original had been passed. Default: each image's own size.
        """
        output_sizes = self._checked_sizes(images, output_sizes)
        proposals = self._propose(images, output_sizes)
        return self.label(proposals, output_sizes, return_probabilities=return_probabilities)
