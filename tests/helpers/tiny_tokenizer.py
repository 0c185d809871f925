"""A character-level Hugging Face fast tokenizer for tests (built locally, never downloaded).

Ids match ``tests.helpers.tiny_models``: ``<pad>`` = 0, ``<s>`` = 1 (prepended as BOS), ``</s>`` = 2, ``[UNK]`` = 3,
then one id per character of :data:`CHARS`; the vocabulary (81 entries) fits the tiny models' ``VOCAB = 97``.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

CHARS = string.ascii_letters + string.digits + " \n.,:;?!='\"-()"
SPECIALS = ("<pad>", "<s>", "</s>", "[UNK]")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: every character of :data:`CHARS` is a token, anything else ``[UNK]``."""
    vocab = {token: index for index, token in enumerate(SPECIALS)}
    vocab.update({char: len(SPECIALS) + index for index, char in enumerate(CHARS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
