"""pipeline.results.search: the demo model's proposals of shapes images, labelled without some classes,
searched for the left-out class names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebseg.balance import balance_class_probs
from ebseg.data.shapes import SHAPES_CLASSES, generate
from ebseg.predictor import Segmenter
from ebseg.proposals import branch_logits
from ebseg.vocab import Vocabulary
from ebseg.zoo import SegmenterSettings, load_model, load_text_tower
from pipeline.results.search import TextScorer, region_mask

NAMES = list(SHAPES_CLASSES)
LEFT_OUT = ("yellow star", "cyan cross")
COUNT = 20


@pytest.fixture(scope="module")
def shapes_run():
    """The demo model labelling 20 shapes images of uneven size with the vocabulary less LEFT_OUT."""
    segmenter = Segmenter(load_model("demo"), [n for n in NAMES if n not in LEFT_OUT], device="cpu")
    data = [generate(i, seed=5, size=(128, 112 + 8 * (i % 4))) for i in range(COUNT)]
    proposals = segmenter.propose([image for image, _ in data])
    return segmenter, data, proposals


@pytest.fixture(scope="module")
def tower():
    return load_text_tower("demo")


def test_text_tower_alone_encodes_as_the_whole_model(tower):
    model = load_model("demo")
    names = ["yellow star", "a dog"]
    assert torch.equal(tower.classifier.encode_names(names), model.text.encode_names(names))
    assert tower.balance == model.config.balance
    assert not any(p.requires_grad for p in tower.classifier.parameters())


def test_a_vocabulary_class_scores_as_labelling_balances_it(shapes_run, tower):
    segmenter, _, proposals = shapes_run
    scorer = TextScorer(tower, segmenter.vocabulary)
    classifier = segmenter.model.text.classifier(segmenter.class_embeddings())
    seen = torch.tensor(segmenter.vocabulary.seen)
    for p in proposals[:3]:
        logits = branch_logits(p.embeddings, classifier)
        probs = balance_class_probs(logits[0], logits[1], logits[2], seen, segmenter.model.config.balance)
        for k, name in enumerate(segmenter.vocabulary.names):
            scores, best = scorer.score(p, name)
            torch.testing.assert_close(scores, probs[:, k], rtol=1e-6, atol=1e-7)
            assert best == int(probs[:, k].argmax())


@pytest.mark.parametrize("text", LEFT_OUT)
def test_left_out_class_ranks_images_holding_it_first(shapes_run, tower, text):
    segmenter, data, proposals = shapes_run
    truth = {str(i): bool((label == NAMES.index(text)).any()) for i, (_, label) in enumerate(data)}
    assert 0 < sum(truth.values()) < COUNT  # the ranking is a real test: some images lack the class
    ranked = TextScorer(tower, segmenter.vocabulary).search(
        [(str(i), p) for i, p in enumerate(proposals)], text
    )
    assert len(ranked) == COUNT
    assert [r.score for _, r in ranked] == sorted((r.score for _, r in ranked), reverse=True)
    assert np.mean([truth[key] for key, _ in ranked[:5]]) >= 0.8
    for _, region in ranked:
        assert 0.0 < region.area <= 1.0 and 0.0 <= region.score <= 1.0
        assert region.area == pytest.approx(region.mask.mean())


def test_best_region_matches_the_labelled_region_of_the_class(shapes_run, tower):
    segmenter, data, proposals = shapes_run
    scorer = TextScorer(tower, segmenter.vocabulary)
    full = Segmenter(segmenter.model, NAMES, device="cpu")  # relabelling with the left-out classes
    labelled = full.label(proposals, [label.shape for _, label in data])
    for text in LEFT_OUT:
        k = NAMES.index(text)
        ranked = scorer.search([(str(i), p) for i, p in enumerate(proposals)], text, limit=5)
        ious = []
        for key, region in ranked:
            i = int(key)
            found = region_mask(proposals[i], region.query, data[i][1].shape)
            assert found.shape == data[i][1].shape and found.dtype == np.bool_
            mine = labelled[i].label_map == k
            ious.append((found & mine).sum() / max((found | mine).sum(), 1))
        assert np.median(ious) >= 0.5, (text, ious)


def test_region_mask_at_grid_size_is_the_grid_region(shapes_run, tower):
    _, _, proposals = shapes_run
    p = proposals[0]
    region = TextScorer(tower).best_region(p, "yellow star")
    assert region is not None
    grid = p.regions()[region.query].numpy()
    np.testing.assert_array_equal(region.mask, grid)
    h, w = p.input_size
    # At the input size each pixel reads the logits of its grid cell's neighbourhood: nearly the same region.
    full = region_mask(p, region.query, (h, w))
    cells = np.kron(grid, np.ones((4, 4), dtype=bool))[:h, :w]
    assert (full == cells).mean() > 0.9


def test_min_area_excludes_small_regions(shapes_run, tower):
    _, _, proposals = shapes_run
    scorer = TextScorer(tower, ["background"])
    p = proposals[1]
    areas = p.regions().flatten(1).float().mean(1)
    largest = float(areas.max())
    region = scorer.best_region(p, "cyan cross", min_area=largest)
    assert region is not None and region.area == pytest.approx(largest)
    assert scorer.best_region(p, "cyan cross", min_area=min(1.0, largest + 1e-3)) is None
    with pytest.raises(ValueError, match="empty"):
        scorer.score(p, "  ")


def test_tiny_tower_is_the_workers_random_model():
    tower = load_text_tower(SegmenterSettings(model="tiny", vocabulary=Vocabulary(["cat"])))
    torch.manual_seed(0)
    model = load_model("tiny")
    names = ["cat", "tree"]
    assert torch.equal(tower.classifier.encode_names(names), model.text.encode_names(names))
