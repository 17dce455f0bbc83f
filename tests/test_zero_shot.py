"""Zero-shot classifier and metrics, on hand-constructed inputs whose answers are known."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from clip_core.model import create_model
from clip_core.tokenizer import Tokenizer
from clip_core.zero_shot import build_zero_shot_classifier, classification_metrics, load_templates, retrieval_metrics

CLASSES = ["cat", "dog", "red car", "tree"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a {} in the scene."]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    words = ["cat", "dog", "red", "car", "tree", "photo", "drawing", "of", "a", "the", "in", "scene"]
    rng = random.Random(0)
    tok = Tokenizer.train([" ".join(rng.choice(words) for _ in range(6)) for _ in range(300)], vocab_size=530,
                          context_length=16)
    torch.manual_seed(0)
    return create_model("tiny-vit", vocab_size=tok.vocab_size).eval(), tok


def test_default_templates():
    templates = load_templates()
    assert 10 <= len(templates) <= 20 and len(set(templates)) == len(templates)
    assert all("{}" in t for t in templates)
    assert load_templates("") == templates


def test_templates_from_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text('- "itap of a {}."\n- "a {} photo."\n')
    assert load_templates(str(good)) == ["itap of a {}.", "a {} photo."]
    for name, text in [("no_slot.yaml", '- "a photo"\n'), ("mapping.yaml", "a: 1\n"), ("empty.yaml", "")]:
        bad = tmp_path / name
        bad.write_text(text)
        with pytest.raises(ValueError, match=name):
            load_templates(str(bad))


def test_classifier_is_normalised_mean_of_normalised_prompts(model_and_tokenizer):
    model, tok = model_and_tokenizer
    expected = []
    with torch.no_grad():
        for name in CLASSES:  # one prompt at a time: no batching in the reference
            prompts = [F.normalize(model.encode_text(tok([t.format(name)])), dim=-1)[0] for t in TEMPLATES]
            expected.append(F.normalize(torch.stack(prompts).mean(0), dim=-1))
    expected = torch.stack(expected, dim=1)
    for batch_size in (1, 7, 256):  # one class per call, two classes per call, all at once
        weights = build_zero_shot_classifier(model, tok, CLASSES, TEMPLATES, batch_size=batch_size)
        assert weights.shape == (model.config.embed_dim, len(CLASSES)) and not weights.requires_grad
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(len(CLASSES)))
    # classes differ only by the class name, which must change the weights
    assert (weights.T @ weights - torch.eye(len(CLASSES))).abs().max() > 1e-3


def test_classification_metrics_known_answer():
    # 8 samples, 3 classes; top-1 predictions [0,0,1 | 1,1,1 | 2,0]
    targets = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 1, 1, 1, 1, 2, 0])
    logits = F.one_hot(predicted, 3).float() + 0.1 * torch.arange(3.0)  # ranks the other classes too
    m = classification_metrics(logits, targets)
    assert m["acc1"] == 6 / 8
    assert m["acc5"] == 1.0  # only 3 classes: top-3 contains everything
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 3, 0], [1, 0, 1]]
    assert m["per_class_recall"] == pytest.approx([2 / 3, 1.0, 1 / 2])
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


def test_top5_and_classes_without_samples():
    # 7 classes; the true class sits at rank 1, 3, 5 and 6 of the 4 samples' scores
    order = [[0, 1, 2, 3, 4, 5, 6], [1, 2, 0, 3, 4, 5, 6], [1, 2, 3, 4, 0, 5, 6], [1, 2, 3, 4, 5, 0, 6]]
    logits = torch.zeros(4, 7)
    for row, ranking in enumerate(order):
        logits[row, ranking] = torch.arange(7, 0, -1).float()
    m = classification_metrics(logits, torch.zeros(4, dtype=torch.long))
    assert (m["acc1"], m["acc5"]) == (1 / 4, 3 / 4)
    assert m["per_class_recall"] == [1 / 4] + [None] * 6  # classes 1..6 have no samples
    assert m["mean_per_class_recall"] == 1 / 4
    assert m["confusion_matrix"][0] == [1, 3, 0, 0, 0, 0, 0]


def test_classification_metrics_rejects_bad_targets():
    with pytest.raises(ValueError, match="targets must lie"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="N > 0"):
        classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_retrieval_metrics_perfect():
    features = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    m = retrieval_metrics(features, features, torch.arange(5), ks=(1, 5, 10))
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in m.values())


def test_retrieval_metrics_partially_wrong():
    # 3 images along the axes, so a text's cosine with image i is its i-th (unit-norm) component.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.0, 0.0],    # t0 -> img0: rank 1
                          [0.0, 0.28, 0.96],  # t1 -> img0: scores 0 / .28 / .96, img0 ranks 3rd
                          [0.8, 0.6, 0.0],    # t2 -> img1: rank 2 (img0 .8 first)
                          [0.0, 0.8, 0.6],    # t3 -> img1: rank 1
                          [0.6, 0.0, 0.8],    # t4 -> img2: rank 1
                          [0.8, 0.0, 0.6],    # t5 -> img2: rank 2
                          [0.28, 0.96, 0.0],  # t6 -> img0: rank 2 (img1 .96 first)
                          [0.0, 0.96, 0.28]])  # t7 -> img2: rank 2
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2, 0, 2])
    m = retrieval_metrics(images, 3 * texts, text_to_image, ks=(1, 2, 10))  # scale: cosine, not dot product
    # text -> image: first-hit ranks [1, 3, 2, 1, 1, 2, 2, 2]
    assert m["image_retrieval_recall@1"] == 3 / 8
    assert m["image_retrieval_recall@2"] == 7 / 8
    assert m["image_retrieval_recall@10"] == 1.0
    # image -> texts: img0's best text is t0 (own): rank 1; img1's best are t6, t7 (.96, other images')
    # then t3 (.8, own): rank 3; img2's best is t1 (.96, img0's) then t4 (.8, own): rank 2
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@10"] == 1.0
    # chunked scoring gives the same numbers
    assert retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 10), batch_size=2) == m


def test_retrieval_metrics_unreadable_image_is_never_retrieved_and_always_a_miss():
    # img2 is unreadable (a zero vector). Every text's cosine with the readable images is negative or
    # small, so unmasked the zero vector (cosine 0) outranks them: masking must make that impossible.
    images = torch.tensor([[1.0, 0.0, 0.0],
                           [0.0, 1.0, 0.0],
                           [0.0, 0.0, 0.0]])
    texts = torch.tensor([[-0.6, -0.8, 0.0],  # t0 -> img0: scores -.6 / -.8 (/ 0 unmasked)
                          [-0.8, -0.6, 0.0],  # t1 -> img1: scores -.8 / -.6 (/ 0 unmasked)
                          [0.6, 0.0, 0.8]])   # t2 -> img2 (unreadable): can only miss
    text_to_image = torch.tensor([0, 1, 2])
    ok = torch.tensor([True, True, False])
    unmasked = retrieval_metrics(images, texts, text_to_image, ks=(1, 10))
    assert unmasked["image_retrieval_recall@1"] == 0.0  # the zero vector wins t0 and t1
    assert unmasked["text_retrieval_recall@10"] == 1.0  # and img2 "finds" its text

    m = retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 10), image_ok=ok)
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)  # t0, t1 hit; t2 misses ...
    assert m["image_retrieval_recall@10"] == pytest.approx(2 / 3)  # ... even with the whole set
    # img0's best text is t2 (.6) then t0: rank 2; img1's is t2 (0) then t1: rank 2; img2 misses
    assert m["text_retrieval_recall@1"] == 0.0
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@10"] == pytest.approx(2 / 3)
    # whatever an unreadable image's features are (e.g. a black image's embedding), nothing changes
    images[2] = texts.sum(dim=0)
    assert retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 10), batch_size=2, image_ok=ok) == m


def test_retrieval_metrics_rejects_bad_mapping():
    with pytest.raises(ValueError, match="one image index"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="one image index"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one bool per image"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.arange(3), image_ok=torch.ones(2, dtype=torch.bool))
