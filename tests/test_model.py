"""model.py: the network's inference-only shortcuts (``encode_image`` / ``encode_text`` under inference mode) equal
the autograd path, and every parameter learns."""
import pytest
import torch
import torch.nn.functional as F

from modelscope_cnclip.model import CLIP

from helpers import TINY_RN, TINY_VIT, random_state_dict


@pytest.mark.parametrize('cfg', [TINY_VIT, TINY_RN], ids=['vit', 'rn'])
def test_inference_shortcuts_equal_the_autograd_path_and_every_parameter_learns(cfg):
    model = CLIP(cfg)
    model.load_state_dict(random_state_dict(cfg))
    model.eval()
    pixels = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids = torch.tensor([[101, 4344, 102, 0], [101, 100, 2523, 102], [101, 102, 0, 0]])
    with torch.inference_mode():
        fast_img, fast_txt = model.encode_image(pixels), model.encode_text(ids)
    img, txt, scale = model(pixels.requires_grad_(), ids)
    assert torch.allclose(F.normalize(fast_img, dim=-1), img, atol=1e-6)
    assert torch.allclose(F.normalize(fast_txt, dim=-1), txt, atol=1e-6)
    logits = scale * img @ txt.T
    loss = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # token type 1 never occurs in Chinese CLIP's input, so its row gets no gradient (the tensor still does)
    assert no_grad == [], no_grad
