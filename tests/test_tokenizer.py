"""tokenizer.py: the reference token ids, truncation and padding, errors, and text the reference tokenises oddly
(a lone surrogate)."""
import pytest
import torch

from modelscope_cnclip import get_tokenizer


def test_tokenizer_reference_ids_truncation_and_padding():
    tok = get_tokenizer()
    assert tok('过年喜庆对联')['input_ids'].tolist() == [[101, 6814, 2399, 1599, 2412, 2190, 5468, 102]]
    long = '这是一段很长的中文文本' * 10
    out = tok([long, '猫'], padding='max_length')
    ids = out['input_ids']
    assert ids.shape == (2, 52) and ids[0, -1] == 102 and ids[0].ne(0).all()
    assert ids[1].tolist()[:3] == [101, 4344, 102] and ids[1, 3:].eq(0).all()
    assert torch.equal(out['attention_mask'], ids.ne(0).long())
    assert tok([long], context_length=77)['input_ids'].shape == (1, 77)
    assert tok(['猫', '小狗'])['input_ids'].shape == (2, 4)  # padded to the longest
    assert tok.tokenize('Hello世界') == ['hello', '世', '界']
    texts = [long, '猫', '过年喜庆对联', ' ']
    assert tok.num_tokens(texts) == tok(texts)['attention_mask'].sum(1).tolist() == [52, 3, 8, 2]
    assert tok.num_tokens(long, context_length=77) == [77]


def test_tokenizer_errors(tmp_path):
    tok = get_tokenizer()
    with pytest.raises(TypeError, match=r'text\[1\]: expected a str, got NoneType'):
        tok(['a', None])
    with pytest.raises(ValueError, match="padding='left'"):
        tok('a', padding='left')
    with pytest.raises(FileNotFoundError, match='vocab file .* not found'):
        get_tokenizer(tmp_path / 'vocab.txt')
    (tmp_path / 'vocab.txt').write_text('a\nb\n')
    with pytest.raises(ValueError, match='special tokens at unexpected ids'):
        get_tokenizer(tmp_path / 'vocab.txt')


def test_lone_surrogates_tokenise_as_unknown(tiny_model):
    """Broken UTF-16 (a lone surrogate) is an unknown character, as in the reference: [UNK], not a crash."""
    ids = tiny_model.tokenizer(['猫\ud800狗', 'a\udfffb'])['input_ids']
    assert ids[0].tolist() == [101, 4344, 100, 4318, 102] and ids[1].tolist()[:3] == [101, 100, 102]
    assert tiny_model.encode_text('猫\ud800狗').shape == (1, 32)
