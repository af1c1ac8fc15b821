"""``Labeller``: a vocabulary applied to images' proposals (text embeddings, balancing, semantic inference).

Everything after the forward pass that depends on the class names lives here (``ebseg.proposals`` says why
that is exact). It needs only a model's text tower and its AdaB balancing exponents, so relabelling stored
proposals (``pipeline.relabel``) builds one without the image towers, and ``Segmenter`` holds one for its
model: a fresh labelling and a relabelling run the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ebseg.balance import balance_class_probs, class_weights
from ebseg.config import BalanceConfig
from ebseg.modeling.text_classifier import TextClassifier
from ebseg.postprocess import GridLogits, Masks, semantic_labels, semantic_probabilities
from ebseg.proposals import Proposals, branch_logits
from ebseg.vocab import Vocabulary


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


class Labeller:
    """Labels ``Proposals`` with a vocabulary.

    text: the model's text classifier (frozen, eval mode, on ``device``); balance: the model's AdaB
    exponents. The vocabulary's text embeddings are computed once per vocabulary and kept.
    """

    def __init__(
        self,
        text: TextClassifier,
        balance: BalanceConfig,
        vocabulary: Vocabulary | Sequence[str],
        *,
        device: str | torch.device = "cpu",
    ):
        self.text = text
        self.balance = balance
        self.device = torch.device(device)
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
                self._text_cache[key] = self.text.encode_names(self._vocabulary.names)
        return self._text_cache[key]

    def classifier(self) -> torch.Tensor:
        """[K + 1, D] scaled text classifier of the current vocabulary (background last)."""
        with torch.inference_mode():
            return self.text.classifier(self.class_embeddings())

    def label(
        self,
        proposals: Sequence[Proposals],
        output_sizes: Sequence[tuple[int, int]],
        *,
        return_probabilities: bool = False,
    ) -> list[Prediction]:
        """Label each image's proposals with the current vocabulary at its (height, width) output size."""
        if len(output_sizes) != len(proposals):
            raise ValueError(f"{len(output_sizes)} output sizes for {len(proposals)} proposals")
        classifier = self.classifier()
        results = []
        with torch.inference_mode():
            for proposal, size in zip(proposals, output_sizes):
                logits = branch_logits(proposal.embeddings.to(self.device), classifier)
                probs = balance_class_probs(logits[0], logits[1], logits[2], self._seen, self.balance)
                # Upsampled band by band inside semantic inference, never whole.
                masks = GridLogits(proposal.masks.to(self.device), proposal.input_size)
                size = (int(size[0]), int(size[1]))
                results.append(self._postprocess(class_weights(probs), masks, size, return_probabilities))
        return results

    def _postprocess(
        self,
        weights: torch.Tensor,
        masks: Masks,
        size: tuple[int, int],
        return_probabilities: bool,
    ) -> Prediction:
        """weights: [Q, K]; masks: [Q, h, w] logits at the model's input size (unpadded), or the
        ``GridLogits`` they are upsampled from.

        The mask logits are resized to ``size`` before semantic inference, as the reference does
        (``ebseg.postprocess``); the full [K, H, W] map is computed only when probabilities are asked for.
        """
        if return_probabilities:
            labels, scores, areas, probabilities = semantic_probabilities(weights, masks, size)
        else:
            (labels, scores, areas), probabilities = semantic_labels(weights, masks, size), None
        return Prediction(
            label_map=labels.cpu().numpy(),
            scores=scores.cpu().numpy(),
            areas=areas.cpu().numpy().astype(np.int64),
            probabilities=None if probabilities is None else probabilities.numpy(),
        )
