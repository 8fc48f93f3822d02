"""Text tokenisation: the BERT WordPiece tokenizer of Chinese CLIP on the Rust ``tokenizers`` library.

Lower-cased, accents stripped, CJK characters split one per token, ``[CLS] + ids[:L-2] + [SEP]`` and
``[PAD]=0`` padding, exactly as ``cn_clip.clip.tokenize``. Padding to the longest text in a batch (the default)
gives the same embeddings as padding to ``L`` and wastes no work on pad tokens.

Two details of the reference differ from a stock ``BertTokenizerFast`` and are matched here: its text cleaning
removes only Cc/Cf control characters (Rust's also drops private-use and unassigned code points, which the
reference keeps and maps to ``[UNK]``), and a word may have up to 200 characters before it becomes ``[UNK]``
(not 100).
"""
from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Literal, Sequence

import torch

from modelscope_cnclip.config import RESOURCES

__all__ = ['Tokenizer', 'DEFAULT_VOCAB', 'get_tokenizer']

DEFAULT_VOCAB = RESOURCES / 'vocab.txt'
SPECIAL_TOKENS = {'[PAD]': 0, '[UNK]': 100, '[CLS]': 101, '[SEP]': 102, '[MASK]': 103}


MAX_CHARS_PER_WORD = 200
_KEEP_CONTROL = frozenset('\t\n\r')


def clean_text(text: str) -> str:
    """The reference's cleaning: drop NUL, U+FFFD and Cc/Cf characters (not tab/newline), map whitespace to ' '.
    Lone surrogates become a private-use character, which tokenises to ``[UNK]`` as in the reference."""
    out = []
    for ch in text:
        if ch in _KEEP_CONTROL or ch == ' ' or unicodedata.category(ch) == 'Zs':
            out.append(' ')
        elif ch == '\x00' or ch == '\ufffd' or unicodedata.category(ch) in ('Cc', 'Cf'):
            continue
        elif '\ud800' <= ch <= '\udfff':
            # A lone surrogate (broken UTF-16, surrogateescape'd bytes) cannot reach the Rust tokenizer; the
            # reference treats it as an unknown character, as it does a private-use one ([UNK]).
            out.append('\ue000')
        else:
            out.append(ch)
    return ''.join(out)


def check_texts(texts: str | Sequence[str], name: str = 'text') -> list[str]:
    """Validate a str or a list of str; the error names the offending item."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f'{name}: expected a str or a list of str, got {type(texts).__name__}')
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f'{name}[{i}]: expected a str, got {type(t).__name__} ({t!r:.60}); '
                            f'convert it with str() or drop it')
    return list(texts)


class Tokenizer:
    """Tokenise Chinese (and any other) text for a Chinese CLIP text tower.

    Args:
        vocab_file: a BERT ``vocab.txt``; defaults to the bert-base-chinese vocabulary every Chinese CLIP uses.
        context_length: maximum tokens per text including ``[CLS]`` and ``[SEP]`` (52 in the official models).
    """

    def __init__(self, vocab_file: str | Path | None = None, context_length: int = 52) -> None:
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers.models import WordPiece
        from tokenizers.normalizers import BertNormalizer
        from tokenizers.pre_tokenizers import BertPreTokenizer

        self.vocab_file = Path(vocab_file or DEFAULT_VOCAB)
        if not self.vocab_file.is_file():
            raise FileNotFoundError(f'vocab file {self.vocab_file} not found; pass the model dir\'s vocab.txt '
                                    f'or leave vocab_file unset for the standard Chinese CLIP vocabulary')
        self.context_length = context_length
        # One token per '\n'-terminated line; str.splitlines() would also split at tokens like U+2028.
        lines = self.vocab_file.read_text(encoding='utf-8').split('\n')
        if lines and lines[-1] == '':
            lines.pop()
        vocab = {token.rstrip('\r'): i for i, token in enumerate(lines)}
        wrong = {t: vocab.get(t) for t, i in SPECIAL_TOKENS.items() if vocab.get(t) != i}
        if wrong:
            raise ValueError(f'{self.vocab_file}: special tokens at unexpected ids {wrong}; '
                             f'Chinese CLIP needs {SPECIAL_TOKENS}')
        self._tok = RustTokenizer(WordPiece(vocab, unk_token='[UNK]', max_input_chars_per_word=MAX_CHARS_PER_WORD))
        self._tok.normalizer = BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=None,
                                              lowercase=True)
        self._tok.pre_tokenizer = BertPreTokenizer()
        self.vocab_size = len(vocab)

    def __call__(self, texts: str | Sequence[str], *, context_length: int | None = None,
                 padding: Literal['longest', 'max_length'] = 'longest') -> dict[str, torch.Tensor]:
        """Tokenise ``texts`` into ``input_ids`` and ``attention_mask``, both ``(N, L)`` int64.

        Args:
            texts: a str or a list of str.
            context_length: truncation length (default: the tokenizer's); longer texts are cut to
                ``L - 2`` word pieces, like the reference.
            padding: ``'longest'`` pads to the longest text in the call, ``'max_length'`` to ``context_length``.
        """
        texts = check_texts(texts)
        length = context_length or self.context_length
        if padding not in ('longest', 'max_length'):
            raise ValueError(f"padding={padding!r}: choose 'longest' or 'max_length'")
        ids = [enc.ids for enc in self._tok.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)]
        rows = [[SPECIAL_TOKENS['[CLS]'], *seq[:length - 2], SPECIAL_TOKENS['[SEP]']] for seq in ids]
        width = length if padding == 'max_length' else max((len(r) for r in rows), default=2)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return {'input_ids': input_ids, 'attention_mask': input_ids.ne(SPECIAL_TOKENS['[PAD]']).long()}

    def num_tokens(self, texts: str | Sequence[str], *, context_length: int | None = None) -> list[int]:
        """Tokens the model reads for each text: word pieces cut like :meth:`__call__` does, plus ``[CLS]`` and
        ``[SEP]`` (so between 2 and ``context_length``); no tensors are built."""
        length = context_length or self.context_length
        encodings = self._tok.encode_batch([clean_text(t) for t in check_texts(texts)], add_special_tokens=False)
        return [min(len(enc.ids), length - 2) + 2 for enc in encodings]

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of one text (no special tokens), for inspection."""
        return self._tok.encode(clean_text(check_texts(text)[0]), add_special_tokens=False).tokens


def get_tokenizer(vocab_file: str | Path | None = None, context_length: int = 52) -> Tokenizer:
    """A :class:`Tokenizer` over ``vocab_file`` (default: the packaged Chinese CLIP vocabulary)."""
    return Tokenizer(vocab_file, context_length)
