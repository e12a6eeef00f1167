"""A character-level tokenizer that is a real `transformers` tokenizer.

One token per character keeps the embedded world tiny and transparent (a completion's length in
tokens is its length in characters), while `save_pretrained` / `AutoTokenizer.from_pretrained`
work offline exactly as for a hub model, so the trainer needs no special case for it.

Why byte-level BPE with no merges rather than a plain word-level model: for a folder whose
config.json says ``model_type: qwen2``, transformers 5 ignores the saved tokenizer class and
rebuilds a `Qwen2Tokenizer` (byte-level BPE) from the saved vocabulary and merges. Storing the
vocabulary in byte-level spelling (space as ``Ġ``, newline as ``Ċ``) with an empty merge list makes
that rebuilt tokenizer give exactly the same ids, one per character (one difference: the rebuilt
one drops characters outside the alphabet instead of mapping them to <unk>).
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
DEFAULT_CHARS = string.digits + string.ascii_lowercase + " +-*/=()?.,:;<>!#\n"


def byte_level_spelling(char: str) -> str:
    """How GPT-2-style byte-level BPE spells a one-byte character: ``" " -> "Ġ"``, ``"a" -> "a"``.

    Printable ASCII other than space keeps its own glyph; other bytes b map to chr(256 + k), k the
    rank of b among those bytes (so ``"\\n"`` (10) -> ``"Ċ"`` (266)).
    """
    code = ord(char)
    if code > 255:
        raise ValueError(f"character {char!r} is not a single byte; use ASCII/Latin-1 characters")
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    if code in kept:
        return char
    return chr(256 + [b for b in range(256) if b not in kept].index(code))


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """Build a left-padding character tokenizer over `chars` plus <pad>, <bos>, <eos>, <unk>.

    Example: ``tok = build_char_tokenizer(); tok("1+2")["input_ids"]`` gives three ids, and
    ``tok.decode(tok("1+2")["input_ids"]) == "1+2"``. Ids: the specials are 0..3, then `chars` in
    order. Characters outside `chars` map to <unk>.
    """
    if len(set(chars)) != len(chars):
        raise ValueError("build_char_tokenizer: `chars` has repeated characters; list each once")
    spelled = [byte_level_spelling(c) for c in chars]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *spelled])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )
