"""The prompt encoder at serving time: a fine-tuned small sentence encoder (all-MiniLM-L6-v2,
int8) with a classification head, in one ONNX file, and the WordPiece tokenizer that ships
with it. It is the cascade's second opinion (`cascade.py`): it runs only on the prompts the
linear model is unsure of.

`encode` is the one way a prompt becomes the encoder's input, shared by training
(`finetune.py`) and serving: the instruction and the pasted passage (`features.split_prompt`)
as a sentence pair, so a long passage is cut before the instruction that decides the label."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from workers.classifier import features
from workers.classifier.model import OnnxModel

MAX_TOKENS = 128  # the fine-tuning length; longer costs quadratically and adds little
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
PROBABILITIES = "probabilities"

Inputs = dict[str, npt.NDArray[np.int64]]


def load_tokenizer(path: Path | str) -> Tokenizer:
    """The tokenizer file as shipped pads every prompt to 128 tokens; here it pads a batch to
    its longest prompt (training's batches; serving encodes one prompt, not padded at all)
    and truncates the longer part of a pair."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_TOKENS, strategy="longest_first")
    return tokenizer


def encode(tokenizer: Tokenizer, texts: Sequence[str]) -> Inputs:
    pairs = [features.split_prompt(text) for text in texts]
    # A prompt without a passage is one sequence, not a pair with an empty second half.
    batch = tokenizer.encode_batch([(head, tail) if tail else head for head, tail in pairs])
    width = max(len(e.ids) for e in batch)
    out = {name: np.zeros((len(batch), width), dtype=np.int64) for name in INPUT_NAMES}
    for row, e in enumerate(batch):
        n = len(e.ids)
        out["input_ids"][row, :n] = e.ids
        out["attention_mask"][row, :n] = e.attention_mask
        out["token_type_ids"][row, :n] = e.type_ids
    return out


def tokenizer_path(model_path: Path | str) -> Path:
    """The tokenizer ships beside the model: `prompt-encoder-v1.tokenizer.json`."""
    path = Path(model_path)
    return path.with_name(f"{path.stem}.tokenizer.json")


class PromptEncoder(OnnxModel):
    """Loads `model_path` and its tokenizer (nothing happens at import)."""

    def __init__(self, model_path: Path | str) -> None:
        super().__init__(model_path)
        self._cascade: dict[str, float] = json.loads(self._meta["cascade"])
        self._tokenizer = load_tokenizer(tokenizer_path(model_path))

    @property
    def threshold(self) -> float:
        """Below this linear-model confidence the cascade asks the encoder (chosen on dev)."""
        return float(self._cascade["threshold"])

    @property
    def weight(self) -> float:
        """The encoder's share of the blended log-probabilities (chosen on dev)."""
        return float(self._cascade["encoder_weight"])

    def probabilities(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """(len(texts), len(labels)) float32 probabilities, columns in `labels` order.

        One prompt per call, never a padded batch: the int8 graph quantizes its activations
        dynamically, with scales taken from the whole input tensor, so in a batch a prompt's
        probabilities moved by up to 0.08 with the prompts that shared it (and a label, with
        them, could depend on what queued together: the preview and the request it explains
        could disagree). Alone, a prompt always gets the same answer, and costs less CPU than
        in a batch (on dev's unsure prompts, 4.1 ms against 5.1 ms: no padding)."""
        out = np.zeros((len(texts), len(self._labels)), dtype=np.float32)
        for row, text in enumerate(texts):
            feed = encode(self._tokenizer, [text])
            out[row] = np.asarray(self._session.run([PROBABILITIES], feed)[0])[0]
        return out
