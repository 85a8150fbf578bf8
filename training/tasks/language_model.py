"""Causal language model: a small GPT-style decoder over bytes (vocabulary 256, no tokenizer).

    task: {name: language_model, options: {block_size: 128, d_model: 128, n_layers: 2}}
    data: {path: ./data/stdlib-docstrings.txt}   # a .txt file or a directory of .txt files

A sample is a fixed-length block of ``block_size + 1`` bytes (input and next-byte target);
block ``i`` of a file starts at byte ``i * block_size``. Files are read memory-mapped, never
loaded whole. The last ``data.val_fraction`` of each file's blocks is held out. Metrics: loss
(nats per byte), perplexity, and the perplexity of a unigram (byte frequency) model fitted on the
training bytes, the trivial baseline to beat.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import mmap
import os
import posixpath
import sysconfig
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from training.core import storage
from training.tasks import (
    Loaded,
    Options,
    StepOutput,
    Task,
    TaskError,
    check_heads_divide_width,
)

VOCAB = 256
# The unigram baseline is fitted on at most this many training bytes (a bounded read).
UNIGRAM_SAMPLE_BYTES = 16 << 20


class LanguageModelOptions(Options):
    block_size: PositiveInt = Field(128, description="Context length in bytes.")
    d_model: PositiveInt = Field(128, description="Width of the decoder.")
    n_heads: PositiveInt = 4
    n_layers: PositiveInt = 2
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    demo_max_bytes: PositiveInt = Field(
        4 << 20, description="Size cap of the demo corpus built from the stdlib's docstrings."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> LanguageModelOptions:
        check_heads_divide_width(self.d_model, self.n_heads)
        return self


class Blocks:
    """Fixed-length byte blocks over memory-mapped files, addressed by a global block id."""

    def __init__(self, files: list[np.ndarray], ranges: list[tuple[int, int]], block: int):
        self.files, self.block = files, block
        self.ranges = ranges  # per file: (first block, end block) of this split
        self.starts = np.cumsum([0] + [end - first for first, end in ranges])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, index: int) -> np.ndarray:
        which = bisect_right(self.starts, index) - 1
        first, _ = self.ranges[which]
        offset = (first + index - int(self.starts[which])) * self.block
        return self.files[which][offset : offset + self.block + 1]


@dataclass(frozen=True)
class CorpusInfo:
    """What ``load`` learns that the metrics report: the trivial baseline to beat."""

    unigram_perplexity: float


class CausalLanguageModel(Task[CorpusInfo]):
    Options = LanguageModelOptions
    options: LanguageModelOptions

    # ---- driver ---------------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        files = self._text_files()
        sizes = [self.data.fs.get_file_info(f).size for f in files]
        train, val = self._split(sizes)
        n_train, n_val = (sum(e - s for s, e in split) for split in (train, val))
        if n_train == 0:
            raise TaskError(
                f"data.path '{self.data.uri}' holds {sum(sizes)} bytes: not one training block "
                f"of {self.options.block_size + 1} bytes"
            )
        listing = [
            (posixpath.relpath(f, self.data.path), s) for f, s in zip(files, sizes, strict=True)
        ]
        return {
            "format": "bytes",
            "train_samples": n_train,
            "val_samples": n_val,
            "files": len(files),
            "bytes": sum(sizes),
            "files_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
        }

    def write_demo(self) -> None:
        text = stdlib_docstrings(self.options.demo_max_bytes)
        print(
            f"Built the demo corpus from the docstrings of Python's standard library "
            f"({len(text)} bytes) at {self.data.uri}",
            flush=True,
        )
        storage.write_bytes(self.data.fs, self.data.path, text)

    def _text_files(self) -> list[str]:
        info = self.data.fs.get_file_info(self.data.path)
        if info.type == pafs.FileType.File:
            return [self.data.path]
        selector = pafs.FileSelector(self.data.path, recursive=True)
        files = sorted(
            i.path
            for i in self.data.fs.get_file_info(selector)
            if i.type == pafs.FileType.File and i.path.endswith(".txt")
        )
        if not files:
            raise TaskError(f"data.path '{self.data.uri}' is a directory without .txt files")
        return files

    def _split(self, sizes: list[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Per file: the (first, end) block ranges of train and of val (the file's tail)."""
        train, val = [], []
        for size in sizes:
            blocks = max(0, (size - 1) // self.options.block_size)
            held = int(blocks * self.data.val_fraction)
            train.append((0, blocks - held))
            val.append((blocks - held, blocks))
        return train, val

    # ---- workers --------------------------------------------------------------------------
    def load(self) -> Loaded[CorpusInfo]:
        files = self._text_files()
        mapped = [self._map(f) for f in files]
        train_ranges, val_ranges = self._split([len(m) for m in mapped])
        block = self.options.block_size
        train, val = Blocks(mapped, train_ranges, block), Blocks(mapped, val_ranges, block)
        return Loaded(train, val, CorpusInfo(unigram_perplexity(train, val)))

    def _map(self, path: str) -> np.ndarray:
        """A local file is memory-mapped; an object-store file is read once into memory."""
        if storage.is_local(self.data.fs):
            with open(path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size == 0:
                    return np.zeros(0, dtype=np.uint8)
                return np.frombuffer(
                    mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8
                )
        return np.frombuffer(storage.read_bytes(self.data.fs, path), dtype=np.uint8)

    def build_model(self, info: CorpusInfo) -> nn.Module:
        return BytesGPT(self.options)  # the vocabulary is fixed: every byte

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks.layers)  # one FSDP unit per Transformer block

    def batch(
        self, samples: Blocks, ids: torch.Tensor, seed: int, *, training: bool
    ) -> torch.Tensor:
        rows = np.stack([samples.get(int(i)) for i in ids])
        return torch.from_numpy(rows.astype(np.int64))

    def step(self, model: nn.Module, batch: torch.Tensor) -> StepOutput:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        tokens = targets.numel()
        totals = {
            "loss": loss.detach().float() * tokens,
            "count": torch.tensor(float(tokens), device=batch.device),
        }
        return StepOutput(loss, totals)

    def metrics(self, totals: dict[str, float], info: CorpusInfo) -> dict[str, float]:
        loss = totals["loss"] / totals["count"]
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "unigram_perplexity": info.unigram_perplexity,
        }


class BytesGPT(nn.Module):
    """Token + position embeddings, pre-norm causal Transformer blocks, tied output head."""

    def __init__(self, cfg: LanguageModelOptions):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        # Small init (GPT-2's 0.02): the tied head starts near uniform (loss ~ ln 256), not at
        # logits with a standard deviation of sqrt(d_model).
        nn.init.normal_(self.embed.weight, std=0.02)
        self.position = nn.Parameter(torch.zeros(cfg.block_size, cfg.d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.n_heads,
            dim_feedforward=4 * cfg.d_model,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.register_buffer(
            "causal", torch.triu(torch.full((cfg.block_size,) * 2, float("-inf")), 1), False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:length]
        hidden = self.blocks(hidden, mask=self.causal[:length, :length], is_causal=True)
        return self.norm(hidden) @ self.embed.weight.T


def unigram_perplexity(train: Blocks, val: Blocks) -> float:
    """Perplexity on (a bounded sample of) val of byte frequencies counted on train."""
    counts = np.ones(VOCAB)  # add-one smoothing: no byte has probability zero
    for blocks, sink in ((train, counts), (val, None)):
        seen, hist = 0, np.zeros(VOCAB)
        for i in range(len(blocks)):
            chunk = blocks.get(i)[:-1]
            hist += np.bincount(chunk, minlength=VOCAB)
            seen += len(chunk)
            if seen >= UNIGRAM_SAMPLE_BYTES:
                break
        if sink is not None:
            sink += hist
        elif hist.sum():
            logp = np.log(counts / counts.sum())
            return float(np.exp(-(hist * logp).sum() / hist.sum()))
    return float("nan")


def stdlib_docstrings(max_bytes: int) -> bytes:
    """Real English text already on every machine: the docstrings of the Python standard
    library's modules, in sorted file order (the same Python gives the same corpus)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        for doc in _docstrings(path):
            encoded = doc.encode("utf-8", errors="ignore") + b"\n\n"
            parts.append(encoded)
            size += len(encoded)
            if size >= max_bytes:
                return b"".join(parts)[:max_bytes]
    return b"".join(parts)


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [
        tree,
        *(
            n
            for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ),
    ]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) > 40]
