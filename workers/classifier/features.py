"""Turning prompts into the classifier's ONNX inputs: the one code path shared by training and
serving. The n-gram counting, TF-IDF weighting and the linear layer live inside the ONNX graph
(see `graph.py`); what is done here is what the graph cannot do cheaply or portably: splitting
the instruction from a pasted passage, lower-casing (ONNX StringNormalizer needs an installed
system locale), a few marker tokens, and hand-made structural features.

Everything here is a pure function of the text: no randomness, no locale, no hashing seed."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# ONNX input names, in the order the graph declares them, and its output.
WORDS, CHARS, PASSAGE, STRUCTURE = "words", "chars", "passage", "structure"
PROBABILITIES = "probabilities"

# The ONNX Tokenizer patterns (RE2 syntax), mirrored by the Python patterns used to build the
# vocabularies; both are plain ASCII classes so RE2 and `re` agree token for token.
WORD_PATTERN = "[a-z0-9_]+"
CHAR_PATTERN = "(?s)."
_WORD_RE = re.compile(WORD_PATTERN)

# Bounds on the work per prompt: the label is decided by the instruction and the gist of the
# passage; a 100k-character paste must not cost more than a 4k one.
MAX_INSTRUCTION_CHARS = 1000
MAX_PASSAGE_CHARS = 3000
MIN_SINGLE_BREAK_PASSAGE_CHARS = 200

_SPACES = re.compile(r"\s+")
_MATH_OPS = re.compile(r"[+\-*/=%^×÷]")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_QUESTION_WORDS = frozenset({
    "what", "who", "whom", "whose", "when", "where", "why", "how", "which", "is", "are", "was",
    "were", "do", "does", "did", "can", "could", "should", "would", "will"})
_IMPERATIVES = frozenset({
    "write", "list", "give", "name", "summarize", "summarise", "classify", "categorize",
    "categorise", "extract", "tell", "describe", "create", "generate", "compose", "brainstorm",
    "suggest", "identify", "explain", "find", "return", "implement", "sort"})
_CODE_MARKS = ("def ", ">>>", '"""', "return ", "import ", "function", "python", "()")

STRUCTURE_NAMES = (
    "has_passage", "log_instruction_chars", "log_passage_chars", "log_instruction_words",
    "instruction_digit_share", "math_operators", "numbers", "code_marks", "ends_with_question",
    "starts_with_question_word", "starts_with_imperative", "comma_share", "has_newline",
    "has_colon", "has_or",
)


def split_prompt(text: str) -> tuple[str, str]:
    """(instruction, passage). The passage is whatever follows the first blank line (how the
    training data joins an instruction to its context); without a blank line, whatever follows
    the first line break if that is long enough to be a pasted text rather than a short list
    (real prompts, and the stage joining a message's text parts, often use one line break)."""
    text = text.replace("\r\n", "\n").strip()
    head, sep, tail = text.partition("\n\n")
    if not sep:
        head, sep, tail = text.partition("\n")
        if len(tail) < MIN_SINGLE_BREAK_PASSAGE_CHARS:
            return text, ""
    return head.strip(), tail.strip()


def _markers(words: list[str], has_passage: bool, instruction: str) -> list[str]:
    # Position matters for intent ("give me a list" opens brainstorming prompts, "what is"
    # opens questions) and a bag of n-grams loses it; so do the first words as tokens.
    marks = ["zzfirst" + str(k) + "_" + "_".join(words[:k]) for k in (1, 2, 3)
             if len(words) >= k]
    marks.append("zzpassage" if has_passage else "zznopassage")
    marks.append("zzendq" if instruction.endswith("?") else "zznoendq")
    return marks


def _structure(instruction: str, passage: str, words: list[str]) -> list[float]:
    n = len(instruction) + 1
    first = words[0] if words else ""
    return [
        float(bool(passage)),
        math.log1p(len(instruction)) / 5.0,
        math.log1p(len(passage)) / 7.0,
        math.log1p(len(words)) / 3.0,
        sum(c.isdigit() for c in instruction) / n,
        min(len(_MATH_OPS.findall(instruction)), 10) / 10.0,
        min(len(_NUMBER.findall(instruction)), 10) / 10.0,
        sum(mark in instruction for mark in _CODE_MARKS) / len(_CODE_MARKS),
        float(instruction.endswith("?")),
        float(first in _QUESTION_WORDS),
        float(first in _IMPERATIVES),
        min(instruction.count(",") / n * 10.0, 1.0),
        float("\n" in instruction),
        float(":" in instruction),
        float(" or " in instruction),
    ]


def prepare(texts: Sequence[str]) -> dict[str, npt.NDArray[np.object_ | np.float32]]:
    """The ONNX feed for a batch of prompts."""
    words_in: list[str] = []
    chars_in: list[str] = []
    passages: list[str] = []
    structure: list[list[float]] = []
    for text in texts:
        raw_instruction, raw_passage = split_prompt(text)
        instruction = raw_instruction[:MAX_INSTRUCTION_CHARS].lower()
        passage = raw_passage[:MAX_PASSAGE_CHARS].lower()
        flat = _SPACES.sub(" ", instruction)
        words = _WORD_RE.findall(flat)
        words_in.append(flat + " " + " ".join(_markers(words, bool(passage), flat)))
        # Spaces around it so the first and last characters make boundary n-grams.
        chars_in.append(" " + flat + " ")
        passages.append(passage)
        structure.append(_structure(instruction, passage, words))
    return {
        WORDS: np.array(words_in, dtype=object),
        CHARS: np.array(chars_in, dtype=object),
        PASSAGE: np.array(passages, dtype=object),
        STRUCTURE: np.array(structure, dtype=np.float32).reshape(len(texts),
                                                                  len(STRUCTURE_NAMES)),
    }


def word_tokens(text: str) -> list[str]:
    """The tokens the ONNX word Tokenizer produces for `text` (used to build vocabularies)."""
    return _WORD_RE.findall(text)
