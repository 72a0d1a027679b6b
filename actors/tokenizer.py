"""An offline byte-level BPE tokenizer, so tiny models need nothing from a hub.

Trained on a small in-memory corpus with a fixed seed-free algorithm (BPE merges are
deterministic for a fixed corpus), wrapped as a `PreTrainedTokenizerFast` so the loading code is
the same one that loads real checkpoints.
"""

from __future__ import annotations

__all__ = ["build_byte_bpe", "TOKENIZER_CORPUS"]

TOKENIZER_CORPUS = [
    "<think>", "</think>", "no further edit needed", "a photo of", "an image of",
    "red green blue yellow purple orange pink brown black white gray",
    "circle square triangle star cross hexagon diamond heart",
    "one two three four five six seven eight nine ten",
    "left of right of above below next to on top of",
    "add remove change make move replace the color to",
    "Does this image show", "Yes", "No", '{"correct": 1}', '{"correct": 0}',
    "cat dog car bicycle person bird horse sheep cow elephant bear zebra giraffe",
    "backpack umbrella handbag tie suitcase bottle cup fork knife spoon bowl banana apple",
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{}",
]


def build_byte_bpe(
    vocab_size: int = 384,
    extra_special_tokens: list[str] | None = None,
    model_max_length: int = 1024,
    corpus: list[str] | None = None,
):
    """Return a `PreTrainedTokenizerFast` with eos `<|endoftext|>` and pad `<|pad|>`, its merges
    learnt from `corpus` (default `TOKENIZER_CORPUS`): a domain corpus with a larger `vocab_size`
    gives whole-word tokens, which small models trained from scratch read far more easily."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos, pad = "<|endoftext|>", "<|pad|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[eos, pad],
        show_progress=False,
    )
    tok.train_from_iterator((corpus or TOKENIZER_CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        bos_token=eos,
        pad_token=pad,
        model_max_length=model_max_length,
    )
    if extra_special_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return fast
