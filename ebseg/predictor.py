"""``Segmenter``: uint8 RGB images of any size in, label maps at their original size out.

It owns everything stateful around the pure model: the vocabulary's cached text embeddings, resizing,
per-image padding, batching, device and autocast, and the post-processing of the reference (balancing of
the three class sources, mask upsampling, crop, resize to the original size, semantic inference).

Each image is padded on its own to a multiple of 32 and only images of equal padded size share a batch,
so an image's result does not depend on its batch neighbours (the reference pads a batch to its largest
image, but its published numbers are at one image per GPU).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ebseg.balance import balance_class_probs, class_weights, semantic_map
from ebseg.model import EBSeg
from ebseg.resize import resize_image, resized_shape
from ebseg.vocab import Vocabulary

# Output rows handled at once when resizing masks to the original size: bounds memory to
# about Q * BAND_ROWS * width floats whatever the image size.
BAND_ROWS = 64


@dataclass
class Prediction:
    """One image's result.

    label_map: [H, W] int32 class ids into the vocabulary, at the input image's size.
    scores: [K] float32 mean probability of each class over the pixels labelled with it (0 if absent).
    areas: [K] int64 pixel count of each class in ``label_map``.
    probabilities: [K, H, W] float32 per-class map before the argmax (the reference's ``sem_seg``),
    only when asked for.
    """

    label_map: np.ndarray
    scores: np.ndarray
    areas: np.ndarray
    probabilities: np.ndarray | None = None


def _check_image(image: object) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {desc}")


def _bilinear_taps(n_in: int, n_out: int, device: torch.device):
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False) along one axis."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    w_hi = src - lo
    return lo, hi, 1 - w_hi, w_hi


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
        self._text_cache: dict[str, torch.Tensor] = {}
        self.vocabulary = vocabulary

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    @vocabulary.setter
    def vocabulary(self, vocabulary: Vocabulary | Sequence[str]) -> None:
        if not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary(list(vocabulary))
        self._vocabulary = vocabulary
        self._seen = torch.tensor(vocabulary.seen, dtype=torch.bool, device=self.device)

    def class_embeddings(self) -> torch.Tensor:
        """[K, D] text embeddings of the current vocabulary, computed once per vocabulary."""
        key = self._vocabulary.id
        if key not in self._text_cache:
            with torch.inference_mode():
                self._text_cache[key] = self.model.text.encode_names(self._vocabulary.names)
        return self._text_cache[key]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) an original of ``height`` x ``width`` is resized to before the model."""
        if self.short_side is None:
            return height, width
        return resized_shape(height, width, self.short_side, self.max_long_side)

    def _prepare(self, image: np.ndarray, original: tuple[int, int]) -> torch.Tensor:
        """(H, W, 3) uint8 -> [3, h, w] uint8 tensor at the model input size of an ``original``-sized image.

        An image that is already at that size (resized by a decode stage elsewhere) is used as it is.
        """
        image = resize_image(image, self.input_shape(*original))
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # copies: inputs may be read-only

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
        for image in images:
            _check_image(image)
        if output_sizes is None:
            output_sizes = [image.shape[:2] for image in images]
        if len(output_sizes) != len(images):
            raise ValueError(f"{len(output_sizes)} output sizes for {len(images)} images")
        output_sizes = [(int(h), int(w)) for h, w in output_sizes]
        prepared = [self._prepare(im, size) for im, size in zip(images, output_sizes)]
        div = self.model.config.size_divisibility
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(prepared):
            padded = (math.ceil(t.shape[1] / div) * div, math.ceil(t.shape[2] / div) * div)
            groups.setdefault(padded, []).append(i)

        text = self.class_embeddings()
        results: list[Prediction | None] = [None] * len(images)
        for (ph, pw), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.zeros(len(chunk), 3, ph, pw, dtype=torch.uint8)
                sizes = []
                for j, i in enumerate(chunk):
                    _, h, w = prepared[i].shape
                    batch[j, :, :h, :w] = prepared[i]
                    sizes.append((h, w))
                with torch.inference_mode():
                    with self._autocast():
                        out = self.model(batch.to(self.device), text, image_sizes=sizes)
                    probs = balance_class_probs(
                        out.logits_a[-1].float(),
                        out.logits_b[-1].float(),
                        out.logits_d.float(),
                        self._seen,
                        self.model.config.balance,
                    )
                    weights = class_weights(probs)
                    masks = F.interpolate(
                        out.pred_masks[-1].float(), size=(ph, pw), mode="bilinear", align_corners=False
                    )
                    for j, i in enumerate(chunk):
                        h, w = sizes[j]
                        results[i] = self._postprocess(
                            weights[j], masks[j, :, :h, :w], output_sizes[i], return_probabilities
                        )
        return results  # type: ignore[return-value]

    def _postprocess(
        self,
        weights: torch.Tensor,
        masks: torch.Tensor,
        size: tuple[int, int],
        return_probabilities: bool,
    ) -> Prediction:
        """weights: [Q, K]; masks: [Q, h, w] logits at the model's input size (unpadded).

        Resizes the mask logits to ``size`` (bilinear, align_corners=False, before semantic inference, as
        the reference) band by band, so memory stays bounded for large originals.
        """
        height, width = size
        num_classes = weights.shape[1]
        rows = _bilinear_taps(masks.shape[1], height, masks.device)
        cols = _bilinear_taps(masks.shape[2], width, masks.device)
        same_size = tuple(masks.shape[1:]) == (height, width)
        labels = torch.empty(height, width, dtype=torch.int32, device=masks.device)
        score_sum = torch.zeros(num_classes, dtype=torch.float64, device=masks.device)
        probabilities = (
            torch.empty(num_classes, height, width, dtype=torch.float32) if return_probabilities else None
        )
        for r0 in range(0, height, BAND_ROWS):
            r1 = min(r0 + BAND_ROWS, height)
            if same_size:
                band = masks[:, r0:r1]
            else:
                lo, hi, w_lo, w_hi = (t[r0:r1] for t in rows)
                band = masks[:, lo] * w_lo[:, None] + masks[:, hi] * w_hi[:, None]
                c_lo, c_hi, cw_lo, cw_hi = cols
                band = band[:, :, c_lo] * cw_lo + band[:, :, c_hi] * cw_hi
            sem = semantic_map(weights, band)
            top, arg = sem.max(dim=0)
            labels[r0:r1] = arg.to(torch.int32)
            score_sum.index_add_(0, arg.flatten(), top.flatten().double())
            if probabilities is not None:
                probabilities[:, r0:r1] = sem.cpu()
        areas = torch.bincount(labels.flatten().long(), minlength=num_classes)
        scores = torch.where(areas > 0, score_sum / areas.clamp(min=1), torch.zeros_like(score_sum))
        return Prediction(
            label_map=labels.cpu().numpy(),
            scores=scores.float().cpu().numpy(),
            areas=areas.cpu().numpy().astype(np.int64),
            probabilities=None if probabilities is None else probabilities.numpy(),
        )
