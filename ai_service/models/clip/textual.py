"""CLIP text encoder: ``textual/model.onnx`` + its tokenizer, in Immich's layout.

The graph's inputs decide how text is fed:

* ``text`` (int32 or int64, 1 x context_length): OpenCLIP exports (Immich's) and Chinese-CLIP. The
  tokenizer is ``textual/tokenizer.json``; for cn-clip that is a BERT WordPiece tokenizer over
  cn-clip's vocabulary (see :func:`bert_wordpiece_tokenizer`). A folder holding only cn-clip's
  ``vocab.txt`` (the official ONNX release) gets that tokenizer built at load.
* ``input_ids`` + ``attention_mask``: M-CLIP (XLM-Roberta / LaBSE text towers).

Text is prepared as Immich does: whitespace collapsed; punctuation stripped and lower-cased when
``text_cfg.tokenizer_kwargs.clean == "canonicalize"``; an NLLB FLORES-200 language code prepended
for ``nllb-*`` models. Padding and truncation to ``text_cfg.context_length`` are the tokenizer's.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import BertProcessing

from ai_service.models.base import ModelLoadError
from ai_service.models.clip.catalog import flores200_code
from ai_service.models.clip.common import check_embedding_size, config_embed_dim, l2_normalize, read_json
from ai_service.runtime.batching import MicroBatcher, make_batcher
from ai_service.runtime.onnx import SessionOptions, create_session

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILE = "vocab.txt"
DEFAULT_CONTEXT_LENGTH = 77  # OpenCLIP's, and Immich's default when text_cfg has none

# cn-clip's FullTokenizer sends words longer than this to [UNK] (tokenizers' WordPiece default is 100).
_CN_CLIP_MAX_WORD_CHARS = 200
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_INT_TYPES = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}

TextKind = Literal["openclip", "cn-clip", "mclip"]


def read_vocab(path: Path) -> dict[str, int]:
    """A BERT ``vocab.txt``: one token per line, id = line number, surrounding whitespace stripped
    (cn_clip's ``load_vocab``; a repeated token keeps its last line, as there)."""
    vocab: dict[str, int] = {}
    with path.open(encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            vocab[line.strip()] = index
    return vocab


def bert_wordpiece_tokenizer(vocab: Path | Mapping[str, int], context_length: int) -> Tokenizer:
    """cn-clip's tokenizer as a fast ``tokenizers`` pipeline, identical in ids to ``cn_clip.clip.tokenize``.

    Built from the same parts as ``tokenizers``' ``BertWordPieceTokenizer`` (BertNormalizer with
    control-char cleanup, CJK splitting, lower-casing + accent stripping; BertPreTokenizer; WordPiece
    with ``##`` continuations and [UNK]) with two changes that match cn_clip's FullTokenizer:
    words of up to 200 characters (not 100) are split before falling back to [UNK], and the special
    tokens are not registered as "added tokens", so a query that literally contains ``[SEP]`` is
    tokenised as text, as cn_clip does. Output: ``[CLS] tokens[:context_length-2] [SEP]`` padded
    with ``[PAD]`` (id 0 in cn-clip's vocabulary) to ``context_length``.
    """
    mapping = read_vocab(vocab) if isinstance(vocab, Path) else dict(vocab)
    missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in mapping]
    if missing:
        raise ValueError(f"vocabulary lacks the BERT special tokens {missing}")
    tokenizer = Tokenizer(WordPiece(mapping, unk_token="[UNK]", max_input_chars_per_word=_CN_CLIP_MAX_WORD_CHARS))
    tokenizer.normalizer = BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = BertPreTokenizer()
    tokenizer.post_processor = BertProcessing(("[SEP]", mapping["[SEP]"]), ("[CLS]", mapping["[CLS]"]))
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(length=context_length, pad_id=mapping["[PAD]"], pad_token="[PAD]")
    return tokenizer


def bert_tokenizer_config(context_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for :func:`bert_wordpiece_tokenizer` (Immich reads ``pad_token``)."""
    return {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "model_max_length": context_length,
    }


def _token_text(value: Any) -> str | None:
    # HF configs spell special tokens either as a string or as {"content": ...} (AddedToken).
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_tokenizer(folder: Path, context_length: int, what: str) -> tuple[Tokenizer, bool]:
    """The tokenizer of a ``textual/`` folder, padded and truncated to ``context_length``.
    Returns it and whether it is cn-clip's BERT WordPiece."""
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        vocab_file = folder / VOCAB_FILE
        if not vocab_file.is_file():
            raise ModelLoadError(f"{what}: {tokenizer_file} is missing (and there is no {VOCAB_FILE} to build it from)")
        try:
            return bert_wordpiece_tokenizer(vocab_file, context_length), True
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{what}: cannot build a tokenizer from {vocab_file}: {exc}") from None
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises plain Exception on malformed files
        raise ModelLoadError(f"{what}: {tokenizer_file} is not a valid tokenizer ({exc})") from None
    config_file = folder / TOKENIZER_CONFIG_FILE
    config = read_json(config_file, what) if config_file.is_file() else {}
    pad_token = _token_text(config.get("pad_token"))
    pad_id = tokenizer.token_to_id(pad_token) if pad_token is not None else None
    if pad_id is None:
        # No usable pad token named: keep whatever padding the tokenizer.json declares, else id 0.
        padding = tokenizer.padding or {}
        pad_id = int(padding.get("pad_id", 0))
        pad_token = str(padding.get("pad_token", tokenizer.id_to_token(pad_id) or "[PAD]"))
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer, type(tokenizer.model).__name__ == "WordPiece"


Feeds = dict[str, np.ndarray]


class ClipTextualEncoder:
    """Thread-safe: the tokenizer is configured once at load and only read afterwards (``encode``
    takes a shared borrow), and ONNX Runtime sessions accept concurrent ``run``.

    Concurrent ``encode_text`` calls are batched into one ONNX Runtime run when the session options turn
    batching on: every query is padded to ``context_length``, so their feeds stack on the batch axis."""

    def __init__(self, name: str, model_dir: Path, config: dict[str, Any], options: SessionOptions) -> None:
        self.name = name
        what = self._what = f"clip model '{name}' (textual)"
        folder = model_dir / "textual"
        text_cfg = config.get("text_cfg") or {}
        if not isinstance(text_cfg, dict):
            raise ModelLoadError(f"{what}: config.json text_cfg must be an object")
        context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
        if not isinstance(context_length, int) or context_length < 3:
            raise ModelLoadError(f"{what}: config.json text_cfg.context_length is {context_length!r}")
        self.context_length: int = context_length
        tokenizer_kwargs = text_cfg.get("tokenizer_kwargs") or {}
        self.canonicalize: bool = isinstance(tokenizer_kwargs, dict) and tokenizer_kwargs.get("clean") == "canonicalize"
        # Immich keys the NLLB language prefix on the model name, and so do we.
        self.is_nllb: bool = name.startswith("nllb")

        self.session = create_session(folder / "model.onnx", options)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._dtypes: dict[str, type[np.integer]] = {}
        if "input_ids" in inputs and "attention_mask" in inputs:
            feeds = ("input_ids", "attention_mask")
        elif "text" in inputs:
            feeds = ("text",)
        else:
            raise ModelLoadError(
                f"{what}: the ONNX model's inputs {sorted(inputs)} are neither 'text' (OpenCLIP, cn-clip) "
                "nor 'input_ids' + 'attention_mask' (M-CLIP)"
            )
        batch_dims = {inputs[feed].shape[0] if inputs[feed].shape else None for feed in feeds}
        fixed = next(iter(batch_dims)) if len(batch_dims) == 1 else None
        # Graphs traced without a dynamic batch axis take exactly that many queries per run.
        self.max_batch: int | None = fixed if isinstance(fixed, int) and fixed > 0 else None
        for feed in feeds:
            dtype = _INT_TYPES.get(inputs[feed].type)
            if dtype is None:
                raise ModelLoadError(f"{what}: input '{feed}' is {inputs[feed].type}, expected int32 or int64")
            self._dtypes[feed] = dtype
            seq = inputs[feed].shape[-1] if inputs[feed].shape else None
            if isinstance(seq, int) and seq != context_length:
                raise ModelLoadError(
                    f"{what}: input '{feed}' takes {seq} tokens but config.json says context_length={context_length}"
                )

        self.tokenizer, is_bert = load_tokenizer(folder, context_length, what)
        self.kind: TextKind = "mclip" if len(feeds) == 2 else ("cn-clip" if is_bert else "openclip")
        self.embedding_size: int = check_embedding_size(
            self.session, config_embed_dim(config), lambda: self._run_chunked(self.tokenize("")), what
        )
        self.batcher: MicroBatcher[Feeds, np.ndarray] | None = make_batcher(
            options.batching, self.session, self._run_rows, fixed_batch=self.max_batch, name=what
        )

    def prepare_text(self, text: str, language: str | None = None) -> str:
        """The string handed to the tokenizer (Immich's ``clean_text`` + NLLB prefix)."""
        text = " ".join(text.split())
        if self.canonicalize:
            text = text.translate(_PUNCTUATION).lower()
        if self.is_nllb and language is not None:
            # Immich glues the code to the text; NLLB's tokenizer knows the code as one token.
            text = f"{flores200_code(language)}{text}"
        return text

    def tokenize(self, text: str, language: str | None = None) -> dict[str, np.ndarray]:
        """The ONNX feeds for one query, batch of 1."""
        encoding = self.tokenizer.encode(self.prepare_text(text, language))
        if self.kind == "mclip":
            return {
                "input_ids": np.asarray([encoding.ids], dtype=self._dtypes["input_ids"]),
                "attention_mask": np.asarray([encoding.attention_mask], dtype=self._dtypes["attention_mask"]),
            }
        return {"text": np.asarray([encoding.ids], dtype=self._dtypes["text"])}

    def _run_raw(self, feeds: Feeds) -> np.ndarray:
        out = self.session.run(None, feeds)[0]
        count = next(iter(feeds.values())).shape[0]
        return np.asarray(out).reshape(count, -1)

    def _run_chunked(self, feeds: Feeds) -> np.ndarray:
        """Feeds of N queries -> N x D raw rows; a graph with a fixed batch axis is fed full chunks of it."""
        step = self.max_batch
        count = next(iter(feeds.values())).shape[0]
        if step is None:
            return self._run_raw(feeds)
        rows = []
        for start in range(0, count, step):
            chunk = {k: v[start : start + step] for k, v in feeds.items()}
            real = next(iter(chunk.values())).shape[0]
            if real < step:  # pad with copies of the last query (always valid input), then drop those rows
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], step - real, axis=0)]) for k, v in chunk.items()}
            rows.append(self._run_raw(chunk)[:real])
        return np.concatenate(rows)

    def _run_rows(self, items: list[Feeds]) -> list[np.ndarray]:
        # The batcher's call: every queued query in one run; rows are normalised in each request's thread.
        stacked = {key: np.concatenate([feeds[key] for feeds in items]) for key in items[0]}
        return list(self._run_chunked(stacked))

    def encode_text(self, text: str, language: str | None = None) -> np.ndarray:
        """One query -> L2-normalised float32 vector of ``embedding_size``."""
        feeds = self.tokenize(text, language)
        row = self._run_chunked(feeds)[0] if self.batcher is None else self.batcher.submit(feeds)
        return l2_normalize(row[None], self._what)[0]

    def encode_texts(self, texts: list[str], language: str | None = None) -> np.ndarray:
        """Several queries -> N x D in one ONNX run (chunked for a fixed batch axis); never waits for others."""
        if not texts:
            return np.zeros((0, self.embedding_size), np.float32)
        return l2_normalize(self._run_rows([self.tokenize(t, language) for t in texts]), self._what)
