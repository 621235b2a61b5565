"""The fake's council judge: it follows the rubric the gateway sends, so a council test can
predict which candidate wins.

The gateway's judge prompt (a fixed contract) ends with the candidates, each in a block::

    <<<candidate 1>>>
    text of answer 1 (any number of lines)
    <<<end>>>

A candidate whose text contains the key (case-insensitive) scores 9, any other 2, and `best`
is the lowest-numbered top scorer."""

from __future__ import annotations

import json
import re

_BLOCK = re.compile(r"<<<candidate (\d+)>>>\n?(.*?)<<<end>>>", re.DOTALL)
_HIT, _MISS = 9, 2


def verdict(prompt: str, key: str) -> str | None:
    """The judge's JSON reply to `prompt`, or None when it holds no candidate blocks."""
    candidates = [(int(number), text) for number, text in _BLOCK.findall(prompt)]
    if not candidates:
        return None
    needle = key.casefold()
    hits = [(number, needle in text.casefold()) for number, text in candidates]
    scores = [{"candidate": number, "score": _HIT if hit else _MISS,
               "reason": "contains the expected answer" if hit
               else "does not contain the expected answer"} for number, hit in hits]
    # With no hit every candidate ties at the low score, and the lowest number still wins.
    best = min([number for number, hit in hits if hit] or [number for number, _ in hits])
    # json.dumps, not orjson: its ", " / ": " separators are the documented reply, byte for byte.
    return json.dumps({"scores": scores, "best": best})
