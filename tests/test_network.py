"""Checks that need the internet (ModelScope hub) or a GPU; skipped by default (see pytest.ini).

Run with ``pytest -m network`` on a machine with internet access, ``pytest -m gpu`` on one with CUDA.
"""
import pytest
import torch

TEXTS = ['杰尼龟', '妙蛙种子', '小火龙', '皮卡丘']
# REFERENCE.md §6: the published probabilities for the pokemon image with ViT-B-16.
POKEMON_PROBS = [1.2687e-03, 5.4369e-02, 6.7958e-04, 9.4368e-01]
POKEMON_URL = 'https://clip-cn-beijing.oss-cn-beijing.aliyuncs.com/pokemon.jpeg'
HUB_ID = 'damo/multi-modal_clip-vit-base-patch16_zh'


@pytest.mark.network
def test_readme_quick_start_gives_the_published_pokemon_probabilities():
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    import modelscope_cnclip  # noqa: F401

    p = pipeline(task=Tasks.multi_modal_embedding, model=HUB_ID, pipeline_name='cnclip-multi-modal-embedding',
                 device='cpu')
    img = p.forward({'img': [POKEMON_URL]})['img_embedding']
    txt = p({'text': TEXTS})['text_embedding']
    probs = ((img / p.model.temperature) @ txt.t()).softmax(-1)[0]
    assert p.model.arch == 'ViT-B-16'
    assert torch.allclose(probs, torch.tensor(POKEMON_PROBS), rtol=5e-2, atol=1e-3), probs.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_gpu_precisions_stay_close_to_fp32(plugin_vit_dir, images, precision):
    from modelscope_cnclip import load
    exact = load(plugin_vit_dir, device='cpu')
    fast = load(plugin_vit_dir, device='cuda:0', precision=precision)
    assert fast.model.text_projection.dtype == {'fp16': torch.float16, 'bf16': torch.bfloat16}[precision]
    for a, b in [(exact.encode_image(images), fast.encode_image(images)),
                 (exact.encode_text(TEXTS), fast.encode_text(TEXTS))]:
        assert b.device.type == 'cuda' and b.dtype == torch.float32
        assert ((a * b.cpu()).sum(-1) > 0.99).all()
