"""The SynthVQA word-level tokenizer, built in code (no download, no training).

Every word that a SynthVQA question or answer can contain is one token; text is split on
whitespace. The result is a stock ``PreTrainedTokenizerFast`` that saves and loads with
``save_pretrained`` / ``from_pretrained`` like any hub tokenizer, and adds ``<s>`` in front of
every encoded text.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from tokenprune.synth.questions import ANSWERS, QUADRANT_WORDS
from tokenprune.synth.scenes import BACKGROUND_COLOURS, SHAPE_COLOURS, SHAPE_KINDS, TEXT_KIND

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IMAGE)
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index(IMAGE)
_QUESTION_WORDS = (
    "what colour is the background ? how many shapes are there is there a written where shape describe : nothing end"
)


def vocabulary() -> list[str]:
    """All tokens, specials first, in a fixed order (the ids are the list positions)."""
    words: list[str] = []
    groups = [
        _QUESTION_WORDS.split(),
        list(BACKGROUND_COLOURS),
        list(SHAPE_COLOURS),
        list(SHAPE_KINDS),
        [TEXT_KIND],
        " ".join(QUADRANT_WORDS.values()).split(),
        *[" ".join(a).split() for a in ANSWERS.values()],
    ]
    for group in groups:
        for w in group:
            if w not in words:
                words.append(w)
    return [*SPECIAL_TOKENS, *words]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` that prepends ``<s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
    )
