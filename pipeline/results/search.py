"""Text search over stored proposals: which region of an image best matches a free text, and how well.

An image's ``Proposals`` (``ebseg.proposals``) hold every mask query's logits on the stride-4 grid and its
three vocabulary-free embeddings (A, B, D). A text is scored against each query the way labelling scores a
class: the text joins the output's vocabulary as one more class, the three branches' distributions are
balanced with the model's AdaB exponents (``ebseg.balance``), and the text's column of the result is the
fused probability of the text times 1 - p(background) of that query. A query's region is its mask
(sigmoid > 0.5, i.e. logit > 0) on the grid; ``region_mask`` maps it to the original size with the same
resizes labelling applies (``Proposals.input_masks``, ``ebseg.postprocess.resize_logits``).

Only the text tower is needed: ``ebseg.zoo.load_text_tower`` builds it alone from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ebseg.balance import balance_class_probs
from ebseg.postprocess import resize_logits
from ebseg.proposals import Proposals, branch_logits
from ebseg.seen import default_synonyms, seen_flags
from ebseg.vocab import Vocabulary
from ebseg.zoo import TextTower


class Region(NamedTuple):
    """An image's best region for a text. mask: bool [ceil(h / 4), ceil(w / 4)] on the grid of the
    unpadded model input; area: its fraction of that grid, in [0, 1]."""

    query: int
    score: float
    area: float
    mask: np.ndarray


def region_mask(proposals: Proposals, query: int, size: tuple[int, int]) -> np.ndarray:
    """bool [H, W]: query ``query``'s region at an original (height, width), mapped back from the grid
    exactly as labelling maps mask logits (upsample to the padded input, crop, resize to ``size``)."""
    logits = resize_logits(proposals.input_masks([query]), (int(size[0]), int(size[1])))
    return (logits[0] > 0).numpy()


class TextScorer:
    """Scores texts against images' proposals with one model's text tower.

    vocabulary: the classes the text competes with for each query besides background (the output's
    labelling vocabulary); None: background alone, so a query's score is 1 - p(background) against the
    text. A text equal to one of its names is that class, not a second copy. Text embeddings are cached.
    """

    def __init__(self, tower: TextTower, vocabulary: Vocabulary | Sequence[str] | None = None):
        if vocabulary is not None and not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary(list(vocabulary))
        self.tower = tower
        self.vocabulary = vocabulary
        self._cache: dict[str, torch.Tensor] = {}
        self._columns_cache: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._names: tuple[str, ...] = () if vocabulary is None else vocabulary.names
        self._seen: tuple[bool, ...] = () if vocabulary is None else vocabulary.seen
        self._embeddings = (
            self._encode(list(self._names)) if self._names else torch.zeros(0, tower.classifier.embed_dim)
        )

    def _encode(self, names: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return self.tower.classifier.encode_names(names).cpu()

    def text_embedding(self, text: str) -> torch.Tensor:
        """[D] unit prompt-ensembled embedding of ``text`` (as a class name)."""
        text = text.strip()
        if not text:
            raise ValueError("empty search text")
        if text not in self._cache:
            self._cache[text] = self._encode([text])[0]
        return self._cache[text]

    def _columns(self, text: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[K' + 1, D] classifier, [K'] seen flags and the text's column, for the vocabulary plus the text
        (kept per text: a search scores one text against many images)."""
        text = text.strip()
        if text not in self._columns_cache:
            self._columns_cache[text] = self._build_columns(text)
        return self._columns_cache[text]

    def _build_columns(self, text: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        if text in self._names:
            embeddings, seen, index = self._embeddings, list(self._seen), self._names.index(text)
        else:
            embeddings = torch.cat([self._embeddings, self.text_embedding(text)[None]])
            seen = [*self._seen, *seen_flags([default_synonyms(text)], normalize=True)]
            index = len(self._names)
        with torch.inference_mode():
            classifier = self.tower.classifier.classifier(
                embeddings.to(self.tower.classifier.bg_embed.device)
            )
        return classifier.cpu(), torch.tensor(seen, dtype=torch.bool), index

    def query_scores(self, embeddings: torch.Tensor, text: str) -> torch.Tensor:
        """embeddings [3, Q, D] (``Proposals.embeddings``) -> per-query scores [Q] float32 in [0, 1]."""
        classifier, seen, index = self._columns(text)
        logits = branch_logits(embeddings, classifier)
        return balance_class_probs(logits[0], logits[1], logits[2], seen, self.tower.balance)[:, index]

    def score(self, proposals: Proposals, text: str) -> tuple[torch.Tensor, int]:
        """Per-query scores [Q] float32 in [0, 1] of ``text`` and the best query (its argmax)."""
        scores = self.query_scores(proposals.embeddings, text)
        return scores, int(scores.argmax())

    def best_query(
        self, embeddings: torch.Tensor, areas: torch.Tensor, text: str, min_area: float = 0.0
    ) -> tuple[int, float, float] | None:
        """(query, score, area) of the highest-scoring query whose region is not empty and covers at least
        ``min_area`` of the image (a fraction), or None when no region does.

        embeddings: [3, Q, D] (``Proposals.embeddings``); areas: float32 [Q], each region's fraction of the
        grid (``Proposals.region_stats``, stored per query as ``areas``: no mask needs decoding).
        """
        scores = self.query_scores(embeddings, text)
        eligible = (areas > 0) & (areas >= min_area)
        if not bool(eligible.any()):
            return None
        query = int(torch.where(eligible, scores, torch.full_like(scores, -1.0)).argmax())
        return query, float(scores[query]), float(areas[query])

    def best_region(self, proposals: Proposals, text: str, min_area: float = 0.0) -> Region | None:
        """``best_query`` of an image's decoded proposals, with the region's mask on the grid."""
        masks = proposals.regions()
        best = self.best_query(proposals.embeddings, masks.flatten(1).float().mean(1), text, min_area)
        if best is None:
            return None
        query, score, area = best
        return Region(query, score, area, masks[query].numpy())

    def search(
        self,
        items: Iterable[tuple[str, Proposals]],
        text: str,
        *,
        min_area: float = 0.0,
        limit: int | None = None,
    ) -> list[tuple[str, Region]]:
        """(image id, best region) of each image that has one, best score first (ties: image id), at most
        ``limit`` of them."""
        found = [(key, r) for key, p in items if (r := self.best_region(p, text, min_area)) is not None]
        found.sort(key=lambda item: (-item[1].score, item[0]))
        return found if limit is None else found[:limit]
