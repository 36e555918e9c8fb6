"""CLIP byte-level BPE tokenizer for GroupViT's text tower, built on the ``tokenizers`` library.

The GroupViT checkpoints use OpenAI CLIP's vocabulary. It ships inside this package
(``assets/bpe_simple_vocab_16e6.txt.gz``, MIT, see ``assets/LICENSE-CLIP.txt``), so ``GroupViTTokenizer()``
needs no files and no network. The ``tokenizers`` pipeline is the one transformers' ``CLIPTokenizerFast`` builds
(``convert_slow_tokenizer.CLIPConverter``): NFC, whitespace runs to one space, lowercase; CLIP's split regex
then byte-level symbols; BPE with the ``</w>`` end-of-word suffix. Ids agree with ``CLIPTokenizerFast`` 4.57.6,
checked against golden ids in ``tests/golden``.

Sequences are ``<|startoftext|> tokens <|endoftext|>``, truncated to keep the start token and the first
tokens with the end token last, and padded on the right with the pad token (``<|endoftext|>``) and
attention mask 0, which is what the text tower's first-eos pooling needs. This module imports numpy and
``tokenizers`` only; the PyTorch and Keras packages feed its int64 arrays to their models.
"""

from __future__ import annotations

import functools
import gzip
import json
import operator
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .io_utils import atomic_write_text, parse_json_bytes, read_json_file, read_text_file

PathLike = Union[str, "os.PathLike[str]"]

VOCAB_ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
# CLIP keeps the first 49152 - 256 - 2 merges of the file so that bytes, merges and the two special tokens
# fill 49408 ids; transformers' CLIPTokenizer cuts merges.txt at the same line.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD_SUFFIX = "</w>"
DEFAULT_MAX_LENGTH = 77
# CLIP's word split: contractions, letter runs, single digits, runs of other non-space characters.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
MERGES_HEADER = "#version: 0.2"
# transformers writes int(1e30) as model_max_length when a tokenizer has no limit of its own.
_UNSET_MAX_LENGTH = 10**20
# Every call pads to model_max_length, so a file may not ask for more than this (CLIP uses 77).
MAX_MODEL_MAX_LENGTH = 2**16

_PADDING_CHOICES = {
    "max_length": "max_length", "longest": "longest", "do_not_pad": False, True: "longest", False: False,
}
_TRUNCATION_CHOICES = {True: True, False: False, "longest_first": True, "only_first": True, "do_not_truncate": False}

Merges = Tuple[Tuple[str, str], ...]


def _bytes_to_unicode() -> List[str]:
    """CLIP/GPT-2's printable stand-in for each byte, in CLIP's id order: printable bytes first, then the rest."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [byte for byte in range(256) if byte not in printable]
    # A printable byte stands for itself; the others are shifted past 255 in byte order.
    return [chr(byte) for byte in printable] + [chr(256 + shift) for shift in range(len(others))]


@functools.lru_cache(maxsize=1)
def _builtin_vocab() -> Tuple[Dict[str, int], Merges]:
    """Vocabulary and merges from the shipped CLIP merges file, in CLIP's id order (read once, then cached)."""
    try:
        with gzip.open(VOCAB_ASSET, "rb") as handle:
            text = handle.read().decode("utf-8")
    except OSError as error:
        raise OSError(f"cannot read the packaged CLIP vocabulary {VOCAB_ASSET}: {error}") from error
    lines = text.split("\n", NUM_MERGES + 1)[1 : NUM_MERGES + 1]  # line 0 is the header
    merges = _parse_merges(lines, VOCAB_ASSET, first_line=2)
    if len(merges) != NUM_MERGES:
        raise OSError(f"packaged CLIP vocabulary {VOCAB_ASSET} has {len(merges)} merges, expected {NUM_MERGES}")
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + END_OF_WORD_SUFFIX for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise OSError(
            f"packaged CLIP vocabulary {VOCAB_ASSET} gives {len(vocab)} distinct tokens, expected {VOCAB_SIZE}"
        )
    return vocab, merges


def _parse_merges(lines: Iterable[str], source: str, first_line: int) -> Merges:
    merges = []
    for number, line in enumerate(lines, start=first_line):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source} line {number}: a merge is two symbols separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return tuple(merges)


def _build_backend(vocab: Dict[str, int], merges: Merges, source: str) -> Tokenizer:
    """The CLIPTokenizerFast pipeline (transformers' CLIPConverter) around a BPE vocabulary."""
    _check_merges_in_vocab(vocab, merges, source)
    try:
        model = BPE(
            vocab=vocab,
            merges=list(merges),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD_SUFFIX,
            fuse_unk=False,
            unk_token=EOS_TOKEN,
        )
    except Exception as error:  # tokenizers reports its own errors as plain Exception
        raise ValueError(f"{source}: not a valid BPE vocabulary: {error}") from error
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # Matched after normalisation (normalized=True), as in CLIPTokenizerFast, so "<|ENDOFTEXT|>" is special too.
    backend.add_special_tokens(
        [
            AddedToken(token, lstrip=False, rstrip=False, normalized=True, special=True)
            for token in (BOS_TOKEN, EOS_TOKEN)
        ]
    )
    return backend


def _check_merges_in_vocab(vocab: Mapping[str, int], merges: Merges, source: str) -> None:
    # Checked here because tokenizers panics on some bad merges (PanicException is not an Exception).
    for rank, (left, right) in enumerate(merges):
        for token in (left, right, left + right):
            if token not in vocab:
                raise ValueError(f"{source}: not a valid BPE vocabulary: merge {rank} ({left} {right}) "
                                 f"needs {token!r}, which is not in the vocabulary")


class TokenizedBatch(dict):
    """Tokenizer output: ``input_ids`` and ``attention_mask`` by key (``batch["input_ids"]``) or attribute."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"TokenizedBatch has no field {name!r}; fields: {sorted(self)}") from None


class GroupViTTokenizer:
    """CLIP BPE tokenizer producing GroupViT text inputs.

    ``GroupViTTokenizer()`` uses the packaged CLIP vocabulary; ``from_pretrained(dir)`` reads a checkpoint's
    tokenizer files. Calling it returns a :class:`TokenizedBatch` of int64 ``input_ids`` and
    ``attention_mask`` with shape (batch, length).
    """

    def __init__(
        self,
        vocab: Optional[Mapping[str, int]] = None,
        merges: Optional[Sequence[Tuple[str, str]]] = None,
        *,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: Optional[str] = None,
    ) -> None:
        """Build from ``vocab`` (token -> id) and ``merges`` (ranked symbol pairs); both None: packaged CLIP."""
        if (vocab is None) != (merges is None):
            raise ValueError("give both vocab and merges, or neither for the packaged CLIP vocabulary")
        if vocab is None:
            vocab, merges = _builtin_vocab()
            source = VOCAB_ASSET
        else:
            vocab, merges = _check_vocab(vocab, "vocab"), _check_merges(merges)
            source = "GroupViTTokenizer(vocab, merges)"
        self._init(_build_backend(vocab, merges, source), vocab, merges, source,
                   model_max_length=model_max_length, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)

    def _init(
        self,
        backend: Tokenizer,
        vocab: Dict[str, int],
        merges: Merges,
        source: str,
        *,
        model_max_length: int,
        bos_token: str,
        eos_token: str,
        pad_token: Optional[str],
    ) -> None:
        # Padding and truncation are done here, never by the backend, whatever a tokenizer.json asked for.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._vocab = vocab
        self._merges = merges
        self._source = source
        self.model_max_length = _check_max_length(model_max_length, "model_max_length")
        pad_token = eos_token if pad_token is None else pad_token
        self._special = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self._special_ids = {}
        for role, token in self._special.items():
            if not isinstance(token, str):
                raise TypeError(f"{role} must be a str, got {type(token).__name__}")
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{role} {token!r} is not in the vocabulary of {source}")
            self._special_ids[role] = token_id

    # ----- properties -----
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token(self) -> str:
        return self._special["bos_token"]

    @property
    def eos_token(self) -> str:
        return self._special["eos_token"]

    @property
    def pad_token(self) -> str:
        return self._special["pad_token"]

    @property
    def bos_token_id(self) -> int:
        return self._special_ids["bos_token"]

    @property
    def eos_token_id(self) -> int:
        return self._special_ids["eos_token"]

    @property
    def pad_token_id(self) -> int:
        return self._special_ids["pad_token"]

    def get_vocab(self) -> Dict[str, int]:
        return dict(self._vocab)

    def __repr__(self) -> str:
        return (f"GroupViTTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"source={self._source!r})")

    # ----- encoding -----
    def tokenize(self, text: str) -> List[str]:
        """BPE tokens of ``text`` without the start and end tokens."""
        _check_one_text(text)
        return self._backend.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, *, max_length: Optional[int] = None, truncation: Any = True) -> List[int]:
        """Ids of one text with the start and end tokens, truncated like ``__call__``, unpadded."""
        _check_one_text(text)
        batch = self(text, padding=False, max_length=max_length, truncation=truncation, return_tensors=None)
        return batch.input_ids[0]

    def __call__(
        self,
        texts: Union[str, Sequence[str]],
        padding: Any = "max_length",
        max_length: Optional[int] = None,
        truncation: Any = True,
        return_tensors: Optional[str] = "np",
    ) -> TokenizedBatch:
        """Tokenize a str or a list of str into ``input_ids`` and ``attention_mask`` of shape (batch, length).

        padding: "max_length" (pad to ``max_length``), "longest" or True (pad to the longest in the batch),
        False or "do_not_pad". max_length defaults to ``model_max_length`` (77). truncation (True) cuts each
        sequence to ``max_length`` keeping the start token and putting the end token last. return_tensors:
        "np" for int64 arrays, None for lists of lists. A single str gives a batch of one.
        """
        batch = _check_texts(texts)
        padding_mode = _choice(_PADDING_CHOICES, padding, "padding")
        truncate = _choice(_TRUNCATION_CHOICES, truncation, "truncation")
        max_length = self.model_max_length if max_length is None else _check_max_length(max_length, "max_length")
        if return_tensors not in ("np", None):
            raise ValueError(
                f"return_tensors must be 'np' or None, got {return_tensors!r}; convert the int64 arrays with "
                "torch.from_numpy or keras.ops.convert_to_tensor"
            )

        encodings = self._backend.encode_batch(batch, add_special_tokens=False)
        bos, eos, pad = self.bos_token_id, self.eos_token_id, self.pad_token_id
        keep = max_length - 2 if truncate else None
        rows = [[bos] + encoding.ids[:keep] + [eos] for encoding in encodings]
        lengths = [len(row) for row in rows]
        if padding_mode == "max_length":
            target = max_length  # as in transformers, a longer untruncated row stays longer
        elif padding_mode == "longest":
            target = max(lengths)
        else:
            target = 0
        masks = [[1] * n + [0] * max(target - n, 0) for n in lengths]
        rows = [row + [pad] * max(target - len(row), 0) for row in rows]
        if return_tensors is None:
            return TokenizedBatch(input_ids=rows, attention_mask=masks)
        width = len(rows[0])
        if any(len(row) != width for row in rows):
            lengths = sorted(len(row) for row in rows)
            raise ValueError(
                f"sequences have different lengths ({lengths[0]}..{lengths[-1]} tokens) with padding={padding!r}, "
                f"truncation={truncation!r}; pad them ('longest' or 'max_length' with truncation) "
                "or pass return_tensors=None for lists"
            )
        input_ids = np.asarray(rows, dtype=np.int64).reshape(len(rows), width)  # (batch, length)
        attention_mask = np.asarray(masks, dtype=np.int64).reshape(len(rows), width)  # (batch, length)
        return TokenizedBatch(input_ids=input_ids, attention_mask=attention_mask)

    # ----- decoding -----
    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence; ``</w>`` becomes a space, as in CLIPTokenizerFast."""
        ids = self._check_ids(ids, "ids")
        return self._finish_decoded(self._backend.decode(ids, skip_special_tokens=bool(skip_special_tokens)))

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> List[str]:
        """Texts of a batch of id sequences (a 2-D array or a list of lists)."""
        if isinstance(sequences, np.ndarray):
            if sequences.ndim != 2:
                raise ValueError(f"batch_decode expects a 2-D array (batch, length), got shape {sequences.shape}")
            sequences = list(sequences)
        elif not isinstance(sequences, (list, tuple)):
            raise TypeError(
                f"batch_decode expects a list of id sequences or a 2-D array, got {type(sequences).__name__}"
            )
        checked = [self._check_ids(ids, f"sequences[{i}]") for i, ids in enumerate(sequences)]
        texts = self._backend.decode_batch(checked, skip_special_tokens=bool(skip_special_tokens))
        return [self._finish_decoded(text) for text in texts]

    @staticmethod
    def _finish_decoded(text: str) -> str:
        return text.replace(END_OF_WORD_SUFFIX, " ").strip()

    def _check_ids(self, ids: Any, name: str) -> List[int]:
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"{name} must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
            ids = ids.tolist()
        elif isinstance(ids, (list, tuple)):
            try:
                ids = [operator.index(i) for i in ids]
            except TypeError:
                bad = next(i for i in ids if not _is_int(i))
                raise TypeError(f"{name} must hold integers, found {type(bad).__name__}") from None
        else:
            raise TypeError(f"{name} must be a list of ints or a 1-D integer array, got {type(ids).__name__}")
        size = self.vocab_size
        for i in ids:
            if not 0 <= i < size:
                raise ValueError(f"{name} holds id {i}, outside the vocabulary [0, {size})")
        return ids

    # ----- files -----
    @classmethod
    def from_pretrained(cls, directory: PathLike) -> "GroupViTTokenizer":
        """Read a checkpoint directory's tokenizer.json, else vocab.json + merges.txt, else use packaged CLIP.

        tokenizer_config.json and special_tokens_map.json, when present, give model_max_length and the
        special tokens (special_tokens_map.json wins, as in transformers).
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise OSError(f"tokenizer directory {directory} does not exist or is not a directory")
        settings = _read_settings(directory)
        tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
        vocab_path = os.path.join(directory, VOCAB_FILE)
        merges_path = os.path.join(directory, MERGES_FILE)
        if os.path.isfile(tokenizer_path):
            backend, vocab, merges = _read_tokenizer_json(tokenizer_path)
            source = tokenizer_path
        elif os.path.isfile(vocab_path) or os.path.isfile(merges_path):
            for path in (vocab_path, merges_path):
                if not os.path.isfile(path):
                    raise OSError(f"{directory} has {VOCAB_FILE} or {MERGES_FILE} but not {os.path.basename(path)}")
            vocab = _check_vocab(_read_json(vocab_path), vocab_path)
            lines = read_text_file(merges_path).strip().split("\n")
            # Like transformers' CLIPTokenizer: line 0 is the header, at most NUM_MERGES merges are used.
            merges = _parse_merges(lines[1 : NUM_MERGES + 1], merges_path, first_line=2)
            backend = _build_backend(vocab, merges, f"{vocab_path} + {merges_path}")
            source = directory
        else:
            vocab, merges = _builtin_vocab()
            backend = _build_backend(vocab, merges, VOCAB_ASSET)
            source = VOCAB_ASSET
        tokenizer = cls.__new__(cls)
        tokenizer._init(backend, vocab, merges, source, **settings)
        return tokenizer

    def save_pretrained(self, directory: PathLike) -> List[str]:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (each atomically).

        transformers' CLIPTokenizer and CLIPTokenizerFast read the directory back with the same ids.
        Returns the written paths.
        """
        directory = os.fspath(directory)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise OSError(f"cannot save tokenizer: {directory} exists and is not a directory")
        os.makedirs(directory, exist_ok=True)
        ordered_vocab = dict(sorted(self._vocab.items(), key=lambda item: item[1]))
        special_map = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.eos_token,  # CLIP has no unknown token: byte-level BPE covers every input
            "pad_token": self.pad_token,
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            **special_map,
        }
        contents = {
            VOCAB_FILE: json.dumps(ordered_vocab, ensure_ascii=False) + "\n",
            MERGES_FILE: MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in self._merges),
            TOKENIZER_CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True) + "\n",
            SPECIAL_TOKENS_MAP_FILE: json.dumps(special_map, indent=2, sort_keys=True) + "\n",
        }
        written = []
        for name, text in contents.items():
            path = os.path.join(directory, name)
            atomic_write_text(path, text)
            written.append(path)
        return written


# ----- validation helpers -----
def _is_int(value: Any) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_texts(texts: Any) -> List[str]:
    if isinstance(texts, str):
        _check_unicode(texts, "texts[0]")
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    if not texts:
        raise ValueError("texts is an empty list; give at least one string")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
        _check_unicode(text, f"texts[{index}]")
    return list(texts)


def _check_one_text(text: Any) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    _check_unicode(text, "text")


def _check_unicode(text: str, label: str) -> None:
    """A str holding a lone surrogate cannot be encoded as UTF-8; say so instead of tokenizers' TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{label} is not valid Unicode: lone surrogate {text[error.start]!r} at position {error.start}"
        ) from None


def _choice(choices: Dict[Any, Any], value: Any, name: str) -> Any:
    # bool keys: a dict lookup would equate True with 1, so look bools and strings up explicitly.
    if isinstance(value, (bool, str)):
        for key, result in choices.items():
            if type(key) is type(value) and key == value:
                return result
    allowed = ", ".join(repr(key) for key in choices)
    raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def _check_max_length(value: Any, name: str) -> int:
    if isinstance(value, bool) or not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = operator.index(value)
    if value < 2:
        raise ValueError(f"{name} must be at least 2 (start and end tokens), got {value}")
    if value > MAX_MODEL_MAX_LENGTH:
        raise ValueError(f"{name} must be at most {MAX_MODEL_MAX_LENGTH}, got {value}")
    return value


def _check_vocab(vocab: Any, source: str) -> Dict[str, int]:
    if not isinstance(vocab, Mapping):
        raise ValueError(f"{source} must map tokens to ids, got {type(vocab).__name__}")
    checked: Dict[str, int] = {}
    for token, index in vocab.items():
        if not isinstance(token, str) or isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{source}: entry {token!r}: {index!r} is not a token -> non-negative id")
        checked[token] = index
    if len(set(checked.values())) != len(checked):
        raise ValueError(f"{source}: two tokens share an id")
    return checked


def _check_merges(merges: Any) -> Merges:
    if not isinstance(merges, (list, tuple)):
        raise TypeError(f"merges must be a list of (symbol, symbol) pairs, got {type(merges).__name__}")
    checked = []
    for index, pair in enumerate(merges):
        if isinstance(pair, str):
            pair = pair.split()
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise ValueError(f"merges[{index}] must be two symbols, got {pair!r}")
        checked.append((pair[0], pair[1]))
    return tuple(checked)


def _read_json(path: str) -> Any:
    return read_json_file(path)


def _token_content(value: Any, path: str, key: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, dict):  # transformers' serialised AddedToken
        value = value.get("content")
    if not isinstance(value, str):
        raise ValueError(f"{path}: {key} must be a string or an object with 'content', got {value!r}")
    return value


def _read_settings(directory: str) -> Dict[str, Any]:
    """model_max_length and special tokens from tokenizer_config.json, then special_tokens_map.json."""
    settings: Dict[str, Any] = {
        "model_max_length": DEFAULT_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": None,
    }
    for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        for key in ("bos_token", "eos_token", "pad_token"):
            token = _token_content(data.get(key), path, key)
            if token is not None:
                settings[key] = token
        if name == TOKENIZER_CONFIG_FILE and data.get("model_max_length") is not None:
            value = data["model_max_length"]
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, int) and not isinstance(value, bool) and value >= _UNSET_MAX_LENGTH:
                continue  # transformers' "no limit" marker: keep CLIP's 77
            try:
                settings["model_max_length"] = _check_max_length(value, "model_max_length")
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}: {error}") from error
    return settings


def _read_tokenizer_json(path: str) -> Tuple[Tokenizer, Dict[str, int], Merges]:
    text = read_text_file(path)
    data = parse_json_bytes(text, path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError(f"{path} does not hold a BPE tokenizer (model.type {model and model.get('type')!r})")
    pre_tokenizer = data.get("pre_tokenizer")
    if not isinstance(pre_tokenizer, dict) or pre_tokenizer.get("type") != "Sequence":
        # transformers' CLIPTokenizerFast rejects the same pre-4.17 layout.
        raise ValueError(
            f"{path} uses the CLIP tokenizer layout of transformers < 4.17 (pre_tokenizer is not a Sequence); "
            f"remove it to use {VOCAB_FILE} + {MERGES_FILE}, or re-export it"
        )
    vocab = _check_vocab(model.get("vocab"), f"{path} model.vocab")
    merges = _check_merges(model.get("merges"))
    _check_merges_in_vocab(vocab, merges, path)
    try:
        backend = Tokenizer.from_str(text)
    except Exception as error:  # tokenizers raises plain Exception on malformed files
        raise ValueError(f"{path} could not be loaded by tokenizers: {error}") from error
    return backend, vocab, merges
