"""The classifier's ONNX graph (training side only: needs the `onnx` package of the `train`
extra). Per n-gram block: Tokenizer → TfIdfVectorizer (binary × idf) → L2 normalisation; then
one linear layer over all blocks and the structural features, and a softmax with a fitted
temperature.

Training runs the same graph without its head to compute the features it fits on, so serving
and training share one implementation of tokenisation and weighting."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from workers.classifier import features

# Pads the Tokenizer's ragged output. Two control characters: never a single-character token
# and never matched by the word pattern, so an n-gram touching it is never in a vocabulary and
# a prompt's features do not depend on the other prompts in its batch.
PAD = "\x00\x01"
OPSET = 17


@dataclass(frozen=True)
class Block:
    """One bag of n-grams over one input: its vocabulary (sorted by length, then text) and the
    inverse document frequency of each entry."""

    name: str
    input: str
    pattern: str
    min_n: int
    max_n: int
    ngrams: tuple[tuple[str, ...], ...]
    idf: npt.NDArray[np.float32]

    def config(self) -> dict[str, object]:
        return {"input": self.input, "pattern": self.pattern, "ngram_range": [self.min_n,
                self.max_n], "size": len(self.ngrams)}


@dataclass(frozen=True)
class Head:
    """The linear layer: weights per block (same order as the blocks), for the structural
    features, the bias, and the softmax temperature."""

    weights: tuple[npt.NDArray[np.float32], ...]
    structure_weights: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32]
    temperature: float


def block_output(block: Block) -> str:
    return f"{block.name}_tfidf"


def _block_nodes(block: Block, weights: npt.NDArray[np.float32] | None
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """The block's nodes, initializers and output: its features (no weights) or its share of
    the label scores."""
    pool: list[str] = []
    starts: list[int] = []
    for n in range(1, block.max_n + 1):
        starts.append(len(pool))
        for gram in block.ngrams:
            if len(gram) == n:
                pool.extend(gram)
    p = block.name
    nodes = [
        helper.make_node("Tokenizer", [block.input], [f"{p}_tokens"], domain="com.microsoft",
                         mark=0, mincharnum=1, pad_value=PAD, tokenexp=block.pattern),
        # Binary term frequency times idf, computed by the op itself: in prompts this short a
        # repeated n-gram is rarely more evidence (cross-validation agrees), and it spares a
        # log over every column, which was a third of the graph's time.
        helper.make_node("TfIdfVectorizer", [f"{p}_tokens"], [f"{p}_w"], mode="IDF",
                         min_gram_length=block.min_n, max_gram_length=block.max_n,
                         max_skip_count=0, ngram_counts=starts, pool_strings=pool,
                         ngram_indexes=list(range(len(block.ngrams))),
                         weights=[float(w) for w in block.idf]),
        helper.make_node("ReduceSumSquare", [f"{p}_w"], [f"{p}_sq"], axes=[1], keepdims=1),
        helper.make_node("Sqrt", [f"{p}_sq"], [f"{p}_norm"]),
        # An empty bag (no passage) stays all zeros instead of 0/0.
        helper.make_node("Max", [f"{p}_norm", "epsilon"], [f"{p}_safe"]),
    ]
    if weights is None:
        nodes.append(helper.make_node("Div", [f"{p}_w", f"{p}_safe"], [block_output(block)]))
        return nodes, [], block_output(block)
    # L2 normalisation is a per-row scale, so it is applied to the 8 scores after the MatMul
    # rather than to every one of the block's columns before it: same result, less work.
    nodes += [helper.make_node("MatMul", [f"{p}_w", f"{p}_W"], [f"{p}_raw"]),
              helper.make_node("Div", [f"{p}_raw", f"{p}_safe"], [f"{p}_scores"])]
    return nodes, [numpy_helper.from_array(weights.astype(np.float32), f"{p}_W")], f"{p}_scores"


def build(blocks: list[Block], head: Head | None, labels: list[str],
          metadata: dict[str, str]) -> onnx.ModelProto:
    """The featurizer (head None: outputs each block's features) or the whole classifier."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.STRING, [None])
              for name in (features.WORDS, features.CHARS, features.PASSAGE)]
    inputs.append(helper.make_tensor_value_info(features.STRUCTURE, TensorProto.FLOAT,
                                                [None, len(features.STRUCTURE_NAMES)]))
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(np.array(1e-12, np.float32), "epsilon")]
    block_weights = head.weights if head is not None else (None,) * len(blocks)
    block_outputs = []
    for block, weights in zip(blocks, block_weights, strict=True):
        block_nodes, block_inits, output = _block_nodes(block, weights)
        nodes += block_nodes
        inits += block_inits
        block_outputs.append(output)
    if head is None:
        outputs = [helper.make_tensor_value_info(block_output(b), TensorProto.FLOAT,
                                                 [None, len(b.ngrams)]) for b in blocks]
    else:
        # Per-block scores summed, rather than concatenating ~50k-wide rows first.
        inits += [numpy_helper.from_array(head.structure_weights.astype(np.float32),
                                          "structure_W"),
                  numpy_helper.from_array(head.bias.astype(np.float32), "bias"),
                  numpy_helper.from_array(np.array(head.temperature, np.float32),
                                          "temperature")]
        nodes += [helper.make_node("MatMul", [features.STRUCTURE, "structure_W"],
                                   ["structure_scores"]),
                  helper.make_node("Sum", [*block_outputs, "structure_scores", "bias"],
                                   ["scores"]),
                  helper.make_node("Mul", ["scores", "temperature"], ["scaled"]),
                  helper.make_node("Softmax", ["scaled"], [features.PROBABILITIES], axis=1)]
        outputs = [helper.make_tensor_value_info(features.PROBABILITIES, TensorProto.FLOAT,
                                                 [None, len(labels)])]
    graph = helper.make_graph(nodes, "prompt_classifier", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="switchyard")
    # Pinned so the file does not change with the installed onnx version's default.
    model.ir_version = 8
    helper.set_model_props(model, {"labels": json.dumps(labels), **metadata})
    onnx.checker.check_model(model)
    return model
