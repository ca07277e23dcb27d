"""The token ids an evaluation runs on: a JSON file of id lists, a text tokenized by the checkpoint's own tokenizer,
or the calibration text shipped with fmtconv (prose, code, math and a few non-English lines).

A tokenizer that cannot cover the text (the fixtures' word-level tokenizers map almost every word to <unk>) would
measure nothing but the unknown token: then seeded random ids in the vocabulary stand in, and the report says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmtconv.errors import FmtconvError

CALIBRATION_TEXT = Path(__file__).with_name("calibration.txt")
DEFAULT_TOKENS = 512
DEFAULT_SEQ_LEN = 512
# Above this share of <unk> ids the tokenizer does not cover the text, and random ids stand in.
MAX_UNKNOWN_SHARE = 0.5
RANDOM_SEED = 0
_FIRST_RANDOM_ID = 3  # past the special ids most vocabularies start with (<unk>, <s>, </s>)


@dataclass
class TokenBatch:
    """Sequences of token ids (not padded; lengths may differ) and where they came from."""

    sequences: list[list[int]]
    source: str

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.sequences]

    def padded(self) -> np.ndarray:
        """[sequences, longest] int32, each sequence right-padded with its last id: causal attention keeps the padding
        out of every real position (the metrics count only those, see `mask`)."""
        batch = np.zeros((len(self.sequences), max(self.lengths)), dtype=np.int32)
        for i, s in enumerate(self.sequences):
            batch[i, : len(s)] = s
            batch[i, len(s) :] = s[-1]
        return batch

    def mask(self) -> np.ndarray:
        """[sequences, longest] bool: the real (unpadded) positions."""
        return np.arange(max(self.lengths))[None, :] < np.asarray(self.lengths)[:, None]


def chunk(ids: list[int], n_tokens: int, seq_len: int) -> list[list[int]]:
    """The first n_tokens ids cut into sequences of seq_len (the last one shorter); at least two ids each."""
    if n_tokens < 2 or seq_len < 2:
        raise FmtconvError(f"--n-tokens and --seq-len must be at least 2, got {n_tokens} and {seq_len}")
    ids = ids[:n_tokens]
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) >= 2]


def read_token_file(path: Path, vocab_size: int) -> TokenBatch:
    """--tokens FILE: a JSON list of lists of token ids, each inside the vocabulary."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FmtconvError(f"cannot read token ids ({e}); expected a JSON list of lists of integers", file=path) from None
    if not (isinstance(data, list) and data and all(isinstance(s, list) and s for s in data)):
        raise FmtconvError("expected a non-empty JSON list of non-empty lists of token ids", file=path)
    for i, seq in enumerate(data):
        for j, t in enumerate(seq):
            if not isinstance(t, int) or isinstance(t, bool):
                raise FmtconvError(f"sequence {i}, position {j}: {t!r} is not an integer token id", file=path)
    check_ids(data, vocab_size, where=path)
    return TokenBatch([list(s) for s in data], f"token ids from {path}")


def check_ids(sequences: list[list[int]], vocab_size: int, where: Path | None = None) -> None:
    for i, seq in enumerate(sequences):
        bad = [t for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise FmtconvError(f"sequence {i} has token id {bad[0]} outside the vocabulary of {vocab_size} ids "
                               f"({len(bad)} such id(s))", file=where)


def tokenize_text(text: str, tokenizer_dirs: list[Path], vocab_size: int, *, label: str) -> tuple[list[int], str] | None:
    """The text's ids by the first directory's tokenizer; None when that tokenizer does not cover the text.
    Raises when no directory has a tokenizer at all."""
    encode, unk, where = _load_tokenizer(tokenizer_dirs)
    ids = [int(t) for t in encode(text)]
    unknown = sum(1 for t in ids if t == unk) / max(len(ids), 1) if unk is not None else 0.0
    if not ids or unknown > MAX_UNKNOWN_SHARE:
        return None
    check_ids([ids], vocab_size, where=where)
    return ids, f"{label}, tokenized by the tokenizer in {where}"


def random_ids(n_tokens: int, vocab_size: int, seed: int = RANDOM_SEED) -> list[int]:
    lo = _FIRST_RANDOM_ID if vocab_size > 2 * _FIRST_RANDOM_ID else 0
    return [int(t) for t in np.random.default_rng(seed).integers(lo, vocab_size, n_tokens)]


def _load_tokenizer(dirs: list[Path]):
    """(encode(text) -> ids, unknown token id or None, directory) of the first tokenizer found: `tokenizer.json` through
    the tokenizers library (the file transformers' fast tokenizers read), else transformers' AutoTokenizer."""
    errors = []
    for d in dirs:
        fast = d / "tokenizer.json"
        try:
            if fast.is_file():
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(fast))
                unk_token = _unk_token(d)
                unk = tok.token_to_id(unk_token) if unk_token else None
                return (lambda s, _t=tok: _t.encode(s, add_special_tokens=False).ids), unk, d
            if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.model").is_file():
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
                return (lambda s, _t=tok: _t.encode(s, add_special_tokens=False)), getattr(tok, "unk_token_id", None), d
            errors.append(f"{d}: no tokenizer files")
        except Exception as e:  # the libraries raise many kinds for an unusable tokenizer
            errors.append(f"{d}: {type(e).__name__}: {e}")
    raise FmtconvError("no tokenizer to turn the text into token ids (" + "; ".join(errors) + "); pass --tokens FILE "
                       "(a JSON list of lists of token ids)")


def _unk_token(d: Path) -> str | None:
    try:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    unk = cfg.get("unk_token")
    return unk.get("content") if isinstance(unk, dict) else unk


def token_batch(*, tokens_file: Path | None, text_file: Path | None, tokenizer_dirs: list[Path], vocab_size: int,
                n_tokens: int = DEFAULT_TOKENS, seq_len: int = DEFAULT_SEQ_LEN) -> TokenBatch:
    """The evaluation's sequences, from --tokens, --text, or the shipped calibration text."""
    if tokens_file is not None and text_file is not None:
        raise FmtconvError("give --tokens or --text, not both")
    if tokens_file is not None:
        return read_token_file(tokens_file, vocab_size)
    if text_file is not None:
        try:
            text = Path(text_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise FmtconvError(f"cannot read the text ({e})", file=text_file) from None
        label = f"the text in {text_file}"
    else:
        text, label = CALIBRATION_TEXT.read_text(), "fmtconv's calibration text"
    found = tokenize_text(text, tokenizer_dirs, vocab_size, label=label)
    if found is None:
        if text_file is not None:
            raise FmtconvError("the checkpoint's tokenizer maps most of this text to its unknown token", file=text_file)
        ids = random_ids(n_tokens, vocab_size)
        return TokenBatch(chunk(ids, n_tokens, seq_len),
                          f"seeded random ids (seed {RANDOM_SEED}): the tokenizer maps most of {label} to its unknown token")
    ids, source = found
    return TokenBatch(chunk(ids, n_tokens, seq_len), source)
