"""Text search over stored proposals: which region of an image best matches a free text, and how well.

An image's ``Proposals`` (``ebseg.proposals``) hold every mask query's logits on the stride-4 grid and its
three vocabulary-free embeddings (A, B, D). A text is scored against each query the way labelling scores a
class: the text joins the output's vocabulary as one more class, the three branches' distributions are
balanced with the model's AdaB exponents (``ebseg.balance``), and the text's column of the result is the
fused probability of the text times 1 - p(background) of that query. A query's region is its mask
(sigmoid > 0.5, i.e. logit > 0) on the grid; ``region_mask`` maps it to the original size with the same
resizes labelling applies (``Proposals.input_masks``, ``ebseg.postprocess.resize_logits``).

Only the text tower is needed: ``ebseg.zoo.load_text_tower`` builds it alone from the checkpoint.

Over an output, search reads each proposals part's embeddings and stored per-query areas and boxes, never
its masks (``rank_part``), in this process or spread over a CPU actor pool on Ray (``search_on_ray``: each
actor loads the text tower once and returns its parts' best ``limit`` hits; the driver keeps the best).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ebseg.balance import balance_class_probs
from ebseg.postprocess import resize_logits
from ebseg.proposals import Proposals, branch_logits
from ebseg.seen import default_synonyms, seen_flags
from ebseg.vocab import Vocabulary
from ebseg.zoo import TextTower, load_text_tower
from pipeline import storage
from pipeline.label.proposal_records import SEARCH_COLUMNS, read_embeddings


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


class Hit(NamedTuple):
    """An image's best region for a text, as search lists it (``bbox``: [x, y, w, h] at the original size)."""

    image_id: str
    query: int
    score: float
    area: float
    bbox: list[int]


HIT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("query", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("area", pa.float32()),
        pa.field("bbox", pa.list_(pa.int32())),
    ]
)


def best_first(hits: Iterable[Hit], limit: int | None) -> list[Hit]:
    """Highest score first, ties by image id; at most ``limit``."""
    ranked = sorted(hits, key=lambda hit: (-hit.score, hit.image_id))
    return ranked if limit is None else ranked[:limit]


def rank_part(
    scorer: TextScorer,
    uri: str,
    text: str,
    min_area: float = 0.0,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Hit]:
    """The best region of every image of the proposals part at ``uri``, read with ``SEARCH_COLUMNS`` only
    (no mask): the one reader of both the in-process search and the actors'."""
    fs, path = storage.url_to_fs(uri, storage_options)
    table = pq.read_table(path, filesystem=fs, columns=list(SEARCH_COLUMNS))
    hits = []
    for image_id, embeddings, areas, boxes in read_embeddings(table):
        best = scorer.best_query(embeddings, areas, text, min_area)
        if best is not None:
            query, score, area = best
            # float32, as listed: the ranking uses the value the table shows.
            hits.append(Hit(image_id, query, float(np.float32(score)), area, boxes[query]))
    return hits


def hits_table(hits: Sequence[Hit]) -> pa.Table:
    return pa.Table.from_pylist([hit._asdict() for hit in hits], schema=HIT_SCHEMA)


class SearchParts:
    """``map_batches`` callable (CPU actor pool): rows {``uri``: a proposals part} -> ``HIT_SCHEMA`` rows,
    the batch's best ``limit`` hits. Each actor loads the text tower once; runs without Ray too."""

    def __init__(
        self,
        model: str,
        vocabulary: Sequence[str],
        *,
        text: str,
        min_area: float = 0.0,
        limit: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ):
        self.scorer = TextScorer(load_text_tower(model), vocabulary)
        self.text, self.min_area, self.limit = text, min_area, limit
        self.storage_options = dict(storage_options or {})

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        hits = []
        for uri in batch["uri"]:
            hits.extend(rank_part(self.scorer, str(uri), self.text, self.min_area, self.storage_options))
        return hits_table(best_first(hits, self.limit))


def search_on_ray(
    parts: Sequence[str],
    model: str,
    vocabulary: Sequence[str],
    text: str,
    *,
    actors: int,
    min_area: float = 0.0,
    limit: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Hit]:
    """The best ``limit`` hits over proposals ``parts`` (URIs), scored by ``actors`` CPU actors on the Ray
    this process is connected to (``pipeline.cluster.ensure_ray`` when it is not)."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.cluster import ensure_ray

    if not parts:
        return []
    ensure_ray()
    ds = ray.data.from_items([{"uri": uri} for uri in parts], override_num_blocks=min(len(parts), 4 * actors))
    ranked = ds.map_batches(
        SearchParts,
        batch_size=1,  # one part per call: each returns at most ``limit`` rows
        batch_format="numpy",
        fn_constructor_args=(model, list(vocabulary)),
        fn_constructor_kwargs={
            "text": text,
            "min_area": min_area,
            "limit": limit,
            "storage_options": storage_options,
        },
        compute=ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    hits = []
    for batch in ranked.iter_batches(batch_size=None, batch_format="pyarrow"):
        hits = best_first([*hits, *(Hit(**row) for row in batch.to_pylist())], limit)
    return hits
