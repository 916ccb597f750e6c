"""Detector adapters (tiny OWLv2 and Grounding DINO), crops and view pooling, categorisers, fuzzy metadata matching."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from fashionshoot.retrieval.categorize import FuzzyMatcher, VLMCategorizer, ZeroShotCategorizer, predict
from fashionshoot.retrieval.detect import (
    Detection,
    Detector,
    TransformersDetector,
    clip_box,
    crop,
    full_box,
    pool_views,
    view_boxes,
)
from fashionshoot.retrieval.encoders import HistogramEncoder
from fashionshoot.retrieval.testing_detect import save_tiny_grounding_dino, save_tiny_owlv2

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory):
    return save_tiny_owlv2(tmp_path_factory.mktemp("owlv2"))


@pytest.fixture(scope="module")
def tiny_grounding_dino(tmp_path_factory):
    return save_tiny_grounding_dino(tmp_path_factory.mktemp("grounding_dino"))


def _assert_labelled_inside(found, images, queries) -> None:
    """Every detection carries one of the queries as its label and a box inside its image."""
    for image, dets in zip(images, found, strict=True):
        assert {d.label for d in dets} <= set(queries)
        for d in dets:
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height


def test_owlv2_adapter_returns_boxes_in_image_pixels_and_crops(tiny_owlv2):
    detector = TransformersDetector(str(tiny_owlv2), threshold=0.0, nms_iou=1.0)
    assert isinstance(detector, Detector)
    wide, tall = Image.new("RGB", (120, 40), (200, 30, 30)), Image.new("RGB", (30, 90), (30, 30, 200))
    queries = ["a photo of a skirt", "a photo of a top"]
    found = detector.detect([wide, tall], queries)
    assert len(found) == 2 and all(found)
    _assert_labelled_inside(found, (wide, tall), queries)
    # independent check of the padded-square conversion: the best raw box, scaled by the long side
    inputs = detector.processor(text=[queries], images=[wide], return_tensors="pt")
    with torch.no_grad():
        raw = detector.model(**inputs)
    best = raw.logits[0].max(-1).values.argmax()
    cx, cy, w, h = (raw.pred_boxes[0, best] * max(wide.size)).tolist()
    top = max(found[0], key=lambda d: d.score)
    expected = clip_box((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), wide.size)
    assert top.box == pytest.approx(expected, abs=1e-3)
    boxes = view_boxes(found[0], wide.size, max_crops=2, min_side=1.0)
    assert 1 <= len(boxes) <= 3 and boxes[-1] == full_box(wide.size)
    for box in boxes[:-1]:
        piece = crop(wide, box)
        assert abs(piece.width - (box[2] - box[0])) <= 1 and abs(piece.height - (box[3] - box[1])) <= 1


def test_grounding_dino_adapter_labels_boxes_by_query_tokens(tiny_grounding_dino):
    from transformers import GroundingDinoForObjectDetection

    detector = TransformersDetector(str(tiny_grounding_dino), threshold=0.0, text_threshold=0.0, nms_iou=1.0)
    assert detector.model_type == "grounding-dino" and isinstance(detector.model, GroundingDinoForObjectDetection)
    assert type(detector.processor.tokenizer).__name__ == "BertTokenizer"
    wide, tall = Image.new("RGB", (120, 40), (200, 30, 30)), Image.new("RGB", (30, 90), (30, 30, 200))
    queries = ["a photo of a skirt", "a photo of a top"]
    found = detector.detect([wide, tall], queries)
    assert [len(dets) for dets in found] == [16, 16], "threshold 0 and no NMS: every one of the 16 queries"
    _assert_labelled_inside(found, (wide, tall), queries)
    # independent check on the wide image alone: token spans of each query in "[CLS] q1 . q2 . [SEP]",
    # per-query score = best token probability, boxes scaled by the image itself (no square padding)
    inputs = detector.processor(text=[queries], images=[wide], return_tensors="pt")
    tokens = detector.processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tokens == ["[CLS]", "a", "photo", "of", "a", "skirt", ".", "a", "photo", "of", "a", "top", ".", "[SEP]"]
    with torch.no_grad():
        raw = detector.model(**inputs)
    probs = raw.logits[0].sigmoid()
    per_query = torch.stack([probs[:, 1:6].amax(1), probs[:, 7:12].amax(1)], dim=1)
    best_score, best_label = per_query.max(1)
    best = int(best_score.argmax())
    cx, cy, w, h = (raw.pred_boxes[0, best] * torch.tensor([120.0, 40.0, 120.0, 40.0])).tolist()
    alone = detector.detect([wide], queries)[0]
    top = max(alone, key=lambda d: d.score)
    assert top.score == pytest.approx(float(best_score[best]), abs=1e-5)
    assert top.label == queries[int(best_label[best])]
    assert top.box == pytest.approx(clip_box((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), wide.size), abs=1e-3)
    assert sorted(d.label for d in alone) == sorted(queries[int(i)] for i in best_label)
    boxes = view_boxes(found[0], wide.size, max_crops=2, min_side=1.0)
    assert 1 <= len(boxes) <= 3 and boxes[-1] == full_box(wide.size)
    for box in boxes[:-1]:  # crops are rounded outwards: at most one pixel more on each side
        piece = crop(wide, box)
        assert 0 <= piece.width - (box[2] - box[0]) < 2 and 0 <= piece.height - (box[3] - box[1]) < 2


def test_grounding_dino_finding_nothing_leaves_the_full_image(tiny_grounding_dino):
    strict = TransformersDetector(str(tiny_grounding_dino), threshold=1.0)
    image = Image.new("RGB", (70, 50), (20, 160, 60))
    assert strict.detect([image], ["a photo of a dress"]) == [[]]
    assert view_boxes([], image.size) == [full_box(image.size)]
    assert strict.detect([image], []) == [[]]


def test_no_usable_detection_falls_back_to_the_full_image():
    size = (100, 80)
    assert view_boxes([], size) == [full_box(size)]
    tiny = [Detection((10, 10, 12, 60), 0.9, "a skirt")]  # 2 px wide: dropped
    assert view_boxes(tiny, size, min_side=8) == [full_box(size)]
    good = [Detection((10, 10, 50, 60), 0.5, "a skirt"), Detection((0, 0, 90, 70), 0.9, "a skirt")]
    boxes = view_boxes(good, size, max_crops=1, padding=0.1)
    assert boxes == [(0.0, 0.0, 99.0, 77.0), full_box(size)], "best detection first, padded and clipped"
    image = Image.new("RGB", size)
    assert crop(image, full_box(size)) is image


@pytest.mark.parametrize("how", ["max", "mean"])
def test_pool_views_equals_a_loop(how):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 9, generator=g)
    owner = torch.tensor([0, 0, 2, 2, 2, 3, 0, 3, 2])
    pooled, best = pool_views(scores, owner, 5, how)
    for q in range(4):
        for lookbook in range(5):
            views = [v for v in range(9) if owner[v] == lookbook]
            if not views:
                assert pooled[q, lookbook] == float("-inf") and best[q, lookbook] == -1
                continue
            values = scores[q, views]
            expected = values.max() if how == "max" else values.mean()
            torch.testing.assert_close(pooled[q, lookbook], expected)
            assert best[q, lookbook] == views[int(values.argmax())]


def _garment(colour: tuple[int, int, int], shape: str) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    if shape == "top":
        draw.rectangle((12, 10, 52, 40), fill=colour)
    else:
        draw.polygon([(20, 8), (44, 8), (56, 58), (8, 58)], fill=colour)
    return image


def test_zero_shot_categoriser_picks_the_category_its_prompts_describe():
    encoder = HistogramEncoder(bins=4)
    categorizer = ZeroShotCategorizer(encoder, ["top", "skirt"],
                                      prompts={"top": ["a red top", "a crimson red shirt"], "skirt": ["a navy skirt"]})
    images = [_garment((200, 32, 42), "top"), _garment((30, 42, 92), "skirt"), _garment((190, 40, 40), "top")]
    probs = categorizer.scores(images)
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(1), torch.ones(3))
    # the third image's histogram scores both prompts exactly alike (0.5 / 0.5): a tie names no category
    assert predict(categorizer, images) == [("top",), ("skirt",), ()]
    assert predict(categorizer, images[:1], top_k=2) == [("top", "skirt")]


def test_vlm_categoriser_maps_free_text_answers_and_refuses_unknown_ones():
    answers = iter([["It is a Skirt.", "a pair of TROUSERS", "a handbag"]])
    categorizer = VLMCategorizer(lambda images, prompt: next(answers), ["top", "skirt", "trousers"], name="fake-vlm")
    assert "top, skirt, trousers" in categorizer.prompt
    probs = categorizer.scores([Image.new("RGB", (8, 8))] * 3)
    assert probs.argmax(1)[:2].tolist() == [1, 2]
    assert torch.allclose(probs[2], torch.full((3,), 1 / 3)), "an unmatched answer must not pick a category"


def test_vlm_categoriser_matches_whole_words_not_substrings():
    categorizer = VLMCategorizer(lambda images, prompt: [], ["top", "outerwear", "dress", "trousers", "skirt"], "fake")
    assert categorizer.match("a t-shirt") is None  # partial_ratio used to find "skirt" inside "t-shirt"
    assert categorizer.match("not a skirt, it's a dress") is None  # names two: no clear winner
    assert [categorizer.match(a) for a in ("Dresses", "outer wear jacket", "a pair of trowsers")] == [2, 1, 3]


def test_fuzzy_matching_restricts_candidates_and_tolerates_typos():
    matcher = FuzzyMatcher({"brand": 85.0, "collection": 70.0})
    gallery = [{"brand": "Maison Margiela", "collection": "SS24"}, {"brand": "Prada"},
               {"brand": "maison margiela", "collection": "FW23"}, {}]
    queries = [matcher.key({"brand": "Maison Margela", "collection": "ss24"}), matcher.key({"brand": "PRADA!"}),
               matcher.key({})]
    mask = matcher.candidates(queries, gallery)
    assert mask.tolist() == [
        [True, False, False, True],  # typo matches; FW23 collection excluded; unknown brand does not restrict
        [False, True, False, True],
        [True, True, True, True],
    ]
