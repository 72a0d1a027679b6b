"""Image placeholder tokens a VLM reasoner must never *generate*.

A sampled `<image>` (or row/column, vision-start, ...) token in an answer makes the learner's forward
pass see more image placeholders than image features, and means nothing as text. The sampler gives
these ids a large negative logit bias; the learner adds the same bias before its log-softmax, so the
behaviour log-probs and the recomputed ones come from the same distribution (ratio 1 before an update).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["image_placeholder_ids", "BANNED_LOGIT_BIAS"]

BANNED_LOGIT_BIAS = -1.0e4  # exp(-1e4) underflows to 0 in fp32: the token is never drawn
_PLACEHOLDER = re.compile(r"image|img|vision|video|fake_token_around|<row_\d+_col_\d+>", re.IGNORECASE)


def image_placeholder_ids(tokenizer: Any) -> list[int]:
    """Sorted ids of the tokenizer's special tokens that mark images or video."""
    tokens = set(getattr(tokenizer, "all_special_tokens", [])) | set(getattr(tokenizer, "additional_special_tokens", []))
    tokens |= {t for t in getattr(tokenizer, "get_added_vocab", dict)() if _PLACEHOLDER.search(t)}
    ids = {tokenizer.convert_tokens_to_ids(t) for t in tokens if _PLACEHOLDER.search(t)}
    unk = getattr(tokenizer, "unk_token_id", None)
    return sorted(i for i in ids if i is not None and i != unk)
