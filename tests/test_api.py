"""The loaded model's scoring contract: ``encode_image`` / ``encode_text`` with ``normalize=``, ``similarity`` (cosine
similarities) and ``probabilities`` (the official quick start's softmax over texts)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modelscope_cnclip import load

TEXTS = ['杰尼龟', '妙蛙种子', '小火龙', '皮卡丘']


@pytest.fixture(scope='module')
def model(plugin_vit_dir: Path):
    return load(plugin_vit_dir)


def test_normalize_false_gives_the_raw_features(model, images) -> None:
    raw_img = model.encode_image(images, normalize=False)
    raw_txt = model.encode_text(TEXTS, normalize=False)
    assert raw_img.shape == (3, 32) and raw_txt.shape == (4, 32) and raw_img.dtype == raw_txt.dtype == torch.float32
    assert not torch.allclose(raw_img.norm(dim=-1), torch.ones(3), atol=1e-3)  # really unnormalised
    # The raw features are the towers' outputs: what the network's own encode_* return on the same input.
    pixels = torch.stack([model.transform(im) for im in images])
    ids = model.tokenizer(TEXTS)['input_ids']
    with torch.inference_mode():
        assert torch.allclose(raw_img, model.model.encode_image(pixels), atol=1e-5)
        assert torch.allclose(raw_txt, model.model.encode_text(ids), atol=1e-5)
    # normalize=True (the default) is the same rows, L2-normalised.
    assert torch.allclose(model.encode_image(images), F.normalize(raw_img, dim=-1), atol=1e-6)
    assert torch.equal(model.encode_text(TEXTS), model.encode_text(TEXTS, normalize=True))
    assert torch.allclose(model.encode_text(TEXTS), F.normalize(raw_txt, dim=-1), atol=1e-6)
    with pytest.raises(TypeError):
        model.encode_text(TEXTS, 8, True)  # normalize is keyword-only


def test_similarity_is_the_cosine_similarity(model, images) -> None:
    sim = model.similarity(images, TEXTS)
    assert sim.shape == (3, 4) and sim.dtype == torch.float32
    want = F.cosine_similarity(model.encode_image(images, normalize=False)[:, None],
                               model.encode_text(TEXTS, normalize=False)[None], dim=-1)
    assert torch.allclose(sim, want, atol=1e-5)
    assert (sim.abs() <= 1 + 1e-6).all() and not torch.allclose(sim.sum(-1), torch.ones(3))  # not probabilities
    assert model.similarity(images[0], '皮卡丘').shape == (1, 1)


def test_probabilities_are_the_softmax_of_the_scaled_similarities(model, images) -> None:
    probs = model.probabilities(images, TEXTS)
    assert probs.shape == (3, 4) and torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-6)
    # REFERENCE §3 and the official quick start: softmax over texts of (img / temperature) @ text.T.
    img, txt = model.encode_image(images), model.encode_text(TEXTS)
    assert torch.allclose(probs, ((img / model.temperature) @ txt.t()).softmax(-1), atol=1e-6)
    assert torch.allclose(probs, (model.similarity(images, TEXTS) / model.temperature).softmax(-1), atol=1e-6)
    with pytest.raises(ValueError, match='probabilities needs at least one text'):
        model.probabilities(images, [])
    with pytest.raises(ValueError, match='similarity needs at least one text'):
        model.similarity(images, [])
