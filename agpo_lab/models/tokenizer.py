"""A character-level tokenizer that is a real `transformers` tokenizer.

One token per character keeps the embedded world tiny and transparent (a completion's length in
tokens is its length in characters), while `save_pretrained` / `AutoTokenizer.from_pretrained`
work offline exactly as for a hub model, so the trainer needs no special case for it.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
DEFAULT_CHARS = string.digits + string.ascii_lowercase + " +-*/=()?.,:;<>!#\n"


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """Build a left-padding character tokenizer over `chars` plus <pad>, <bos>, <eos>, <unk>.

    Example: ``tok = build_char_tokenizer(); tok("1+2")["input_ids"]`` gives three ids, and
    ``tok.decode(tok("1+2")["input_ids"]) == "1+2"``. Unknown characters map to <unk>.
    """
    if len(set(chars)) != len(chars):
        raise ValueError("build_char_tokenizer: `chars` has repeated characters; list each once")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )
