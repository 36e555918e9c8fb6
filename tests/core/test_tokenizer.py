"""GroupViTTokenizer against golden ids from transformers' CLIPTokenizerFast (tools/make_tokenizer_golden.py).

The golden corpus (tests/golden/tokenizer_corpus.json) holds captions, class names, punctuation, numbers,
contractions, accents, emoji, CJK, whitespace runs, special-token strings and over-long texts.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from groupvit_core.tokenizer import GroupViTTokenizer, TokenizedBatch

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return GroupViTTokenizer()


@pytest.fixture(scope="module")
def corpus():
    with open(os.path.join(GOLDEN, "tokenizer_corpus.json"), encoding="utf-8") as handle:
        texts = json.load(handle)
    assert len(texts) >= 1000
    return texts


@pytest.fixture(scope="module")
def golden():
    with np.load(os.path.join(GOLDEN, "tokenizer_ids.npz"), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _full_rows(golden):
    ids, offsets = golden["full_ids"], golden["full_offsets"]
    return [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def _strings(golden, name):
    blob, offsets = golden[name + "_utf8"].tobytes(), golden[name + "_offsets"]
    return [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


def _assert_rows_equal(actual, expected, corpus, index=None):
    index = range(len(corpus)) if index is None else index
    assert actual.shape == expected.shape
    bad = np.flatnonzero((actual != expected).any(axis=1))
    assert bad.size == 0, f"{bad.size} rows differ, first texts: {[corpus[index[i]] for i in bad[:3]]!r}"


# ----- golden ids -----
def test_max_length_padding_matches_golden_for_whole_corpus(tok, corpus, golden):
    batch = tok(corpus, padding="max_length", max_length=77)
    assert isinstance(batch, TokenizedBatch)
    assert batch.input_ids.dtype == np.int64 and batch.attention_mask.dtype == np.int64
    assert batch.input_ids.shape == (len(corpus), 77)
    _assert_rows_equal(batch.input_ids, golden["input_ids"], corpus)
    _assert_rows_equal(batch.attention_mask, golden["attention_mask"], corpus)
    assert batch["input_ids"] is batch.input_ids


def test_defaults_are_max_length_77(tok, corpus, golden):
    batch = tok(corpus[:50])
    np.testing.assert_array_equal(batch.input_ids, golden["input_ids"][:50])


def test_short_max_length_matches_golden(tok, corpus, golden):
    batch = tok(corpus, padding="max_length", max_length=16, truncation=True)
    _assert_rows_equal(batch.input_ids, golden["input_ids_16"], corpus)
    _assert_rows_equal(batch.attention_mask, golden["attention_mask_16"], corpus)


def test_longest_padding_matches_golden_batches(tok, corpus, golden):
    batches = sorted(int(key.rsplit("_", 1)[1]) for key in golden if key.startswith("longest_index_"))
    assert len(batches) >= 4
    for k in batches:
        index = golden[f"longest_index_{k}"].tolist()
        for padding in ("longest", True):
            batch = tok([corpus[i] for i in index], padding=padding, max_length=77, truncation=True)
            _assert_rows_equal(batch.input_ids, golden[f"longest_ids_{k}"], corpus, index)
            _assert_rows_equal(batch.attention_mask, golden[f"longest_mask_{k}"], corpus, index)


def test_untruncated_lists_match_golden(tok, corpus, golden):
    batch = tok(corpus, padding=False, truncation=False, return_tensors=None)
    expected = _full_rows(golden)
    assert batch.input_ids == expected
    assert batch.attention_mask == [[1] * len(row) for row in expected]


def test_decode_matches_golden(tok, corpus, golden):
    decoded = tok.batch_decode(golden["input_ids"], skip_special_tokens=True)
    assert decoded == _strings(golden, "decoded")
    unpadded = [row[mask.astype(bool)] for row, mask in zip(golden["input_ids"], golden["attention_mask"])]
    assert [tok.decode(row, skip_special_tokens=False) for row in unpadded] == _strings(golden, "decoded_special")
    assert tok.decode(golden["input_ids"][0].tolist()) == _strings(golden, "decoded")[0]


# ----- truncation and padding -----
def test_truncation_keeps_bos_and_puts_eos_last(tok, corpus, golden):
    full = _full_rows(golden)
    long_rows = [i for i, row in enumerate(full) if len(row) > 77]
    assert len(long_rows) >= 10
    batch = tok([corpus[i] for i in long_rows], max_length=77)
    assert (batch.input_ids[:, 0] == BOS).all() and (batch.input_ids[:, -1] == EOS).all()
    assert (batch.attention_mask == 1).all()
    for row, i in zip(batch.input_ids, long_rows):
        assert row[1:76].tolist() == full[i][1:76]


def test_padding_is_right_with_eos_and_mask_zero(tok):
    batch = tok(["a photo of a cat", "a"], padding="max_length", max_length=10)
    np.testing.assert_array_equal(batch.input_ids[1], [BOS, 320, EOS] + [EOS] * 7)
    np.testing.assert_array_equal(batch.attention_mask[1], [1, 1, 1] + [0] * 7)
    assert tok.pad_token_id == tok.eos_token_id == EOS and tok.bos_token_id == BOS and tok.vocab_size == 49408


def test_str_input_is_a_batch_of_one(tok, golden, corpus):
    batch = tok(corpus[0])
    np.testing.assert_array_equal(batch.input_ids, golden["input_ids"][:1])


def test_unpadded_ragged_batch_needs_lists(tok):
    with pytest.raises(ValueError, match="different lengths"):
        tok(["a photo of a cat", "a"], padding=False)
    with pytest.raises(ValueError, match="different lengths"):
        tok(["cat " * 100, "a"], padding="max_length", truncation=False)
    lists = tok(["a photo of a cat", "a"], padding=False, return_tensors=None)
    assert [len(row) for row in lists.input_ids] == [7, 3]
    same = tok(["a cat", "a dog"], padding=False)
    assert same.input_ids.shape == (2, 4)


def test_untruncated_max_length_padding_keeps_long_rows(tok):
    batch = tok(["cat " * 100], padding="max_length", max_length=77, truncation=False)
    assert batch.input_ids.shape == (1, 102) and batch.input_ids[0, -1] == EOS


@pytest.mark.parametrize("bad", [None, 5, 3.5, b"bytes", ["ok", None], ["ok", 3], ("ok", b"x"), {"a": 1}])
def test_non_string_input_raises_type_error(tok, bad):
    with pytest.raises(TypeError, match="texts"):
        tok(bad)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_length": 1}, ValueError),
        ({"max_length": 0}, ValueError),
        ({"max_length": -5}, ValueError),
        ({"max_length": 7.0}, TypeError),
        ({"max_length": True}, TypeError),
        ({"padding": "maxlength"}, ValueError),
        ({"padding": 1}, ValueError),
        ({"truncation": "yes"}, ValueError),
        ({"return_tensors": "pt"}, ValueError),
    ],
)
def test_bad_options_raise(tok, kwargs, error):
    with pytest.raises(error):
        tok(["a photo of a cat"], **kwargs)


def test_empty_batch_and_bad_ids_raise(tok):
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([BOS, 49408])
    with pytest.raises(TypeError, match="integers"):
        tok.decode([BOS, "a"])
    with pytest.raises(ValueError, match="2-D"):
        tok.batch_decode(np.zeros(3, dtype=np.int64))


def test_single_text_helpers(tok, corpus, golden):
    full = _full_rows(golden)
    assert tok.encode(corpus[0]) == full[0]
    assert tok.tokenize("a photo") == ["a</w>", "photo</w>"]
    for bad in (None, ["a"], b"a"):
        with pytest.raises(TypeError, match="text must be a str"):
            tok.encode(bad)


def test_explicit_vocab_and_merges(tok, corpus, golden, tmp_path):
    tok.save_pretrained(tmp_path)
    with open(tmp_path / "merges.txt", encoding="utf-8") as handle:
        merges = [tuple(line.split()) for line in handle.read().splitlines()[1:]]
    built = GroupViTTokenizer(tok.get_vocab(), merges, model_max_length=32)
    np.testing.assert_array_equal(built(corpus[:200], max_length=77).input_ids, golden["input_ids"][:200])
    assert built(["cat"]).input_ids.shape == (1, 32)
    with pytest.raises(ValueError, match="both vocab and merges"):
        GroupViTTokenizer(tok.get_vocab())
    with pytest.raises(ValueError, match="not a valid BPE vocabulary"):
        GroupViTTokenizer({"a": 0, "b": 1}, [("a", "b")])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        GroupViTTokenizer(bos_token="<|nope|>")


def test_max_length_two_gives_bos_eos(tok):
    batch = tok(["a photo of a cat", ""], max_length=2)
    np.testing.assert_array_equal(batch.input_ids, [[BOS, EOS], [BOS, EOS]])


# ----- files -----
def test_save_pretrained_round_trip(tok, corpus, golden, tmp_path):
    written = tok.save_pretrained(tmp_path / "tok")
    names = sorted(os.path.basename(path) for path in written)
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(os.listdir(tmp_path / "tok")) == names  # no temporary files left behind
    with open(tmp_path / "tok" / "vocab.json", encoding="utf-8") as handle:
        vocab = json.load(handle)
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    with open(tmp_path / "tok" / "merges.txt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894 and lines[1] == "i n"

    loaded = GroupViTTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.model_max_length == 77 and loaded.vocab_size == 49408
    _assert_rows_equal(loaded(corpus).input_ids, golden["input_ids"], corpus)


def test_from_pretrained_reads_model_max_length_and_special_tokens_map(tok, tmp_path):
    directory = tmp_path / "tok"
    tok.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16, "pad_token": "!"}))
    (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|endoftext|>"}}))
    loaded = GroupViTTokenizer.from_pretrained(directory)
    assert loaded.model_max_length == 16 and loaded.pad_token_id == EOS
    assert loaded(["cat " * 50]).input_ids.shape == (1, 16)

    # transformers writes int(1e30) when a tokenizer has no limit: CLIP's 77 is kept.
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 1000000000000000019884624838656}')
    assert GroupViTTokenizer.from_pretrained(directory).model_max_length == 77
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 1}')
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        GroupViTTokenizer.from_pretrained(directory)
    (directory / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GroupViTTokenizer.from_pretrained(directory)


def _reference_layout_tokenizer_json(directory):
    """tokenizer.json as transformers 4.57.6 saves it: the golden layout refilled with the saved vocabulary."""
    with open(os.path.join(GOLDEN, "tokenizer_hf_layout.json"), encoding="utf-8") as handle:
        layout = json.load(handle)
    with open(directory / "vocab.json", encoding="utf-8") as handle:
        layout["model"]["vocab"] = json.load(handle)
    with open(directory / "merges.txt", encoding="utf-8") as handle:
        layout["model"]["merges"] = [line.split() for line in handle.read().splitlines()[1:]]
    return layout


def test_from_pretrained_prefers_tokenizer_json(tok, corpus, golden, tmp_path):
    directory = tmp_path / "tok"
    tok.save_pretrained(directory)
    layout = _reference_layout_tokenizer_json(directory)
    layout["padding"] = {"strategy": {"Fixed": 5}, "direction": "Left", "pad_to_multiple_of": None, "pad_id": 0,
                         "pad_type_id": 0, "pad_token": "!"}  # backend settings are ignored
    (directory / "tokenizer.json").write_text(json.dumps(layout, ensure_ascii=False), encoding="utf-8")
    os.remove(directory / "merges.txt")  # tokenizer.json alone is enough
    os.remove(directory / "vocab.json")
    loaded = GroupViTTokenizer.from_pretrained(directory)
    _assert_rows_equal(loaded(corpus).input_ids, golden["input_ids"], corpus)
    assert loaded.batch_decode(golden["input_ids"][:20]) == _strings(golden, "decoded")[:20]

    resaved = tmp_path / "resaved"
    loaded.save_pretrained(resaved)
    np.testing.assert_array_equal(GroupViTTokenizer.from_pretrained(resaved)(corpus).input_ids, golden["input_ids"])


def test_from_pretrained_rejects_old_or_broken_files(tok, tmp_path):
    directory = tmp_path / "tok"
    tok.save_pretrained(directory)
    layout = _reference_layout_tokenizer_json(directory)
    layout["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (directory / "tokenizer.json").write_text(json.dumps(layout), encoding="utf-8")
    with pytest.raises(ValueError, match="4.17"):
        GroupViTTokenizer.from_pretrained(directory)
    layout = _reference_layout_tokenizer_json(directory)
    del layout["model"]["vocab"]["ca"]
    (directory / "tokenizer.json").write_text(json.dumps(layout), encoding="utf-8")
    with pytest.raises(ValueError, match="'ca'"):
        GroupViTTokenizer.from_pretrained(directory)
    os.remove(directory / "tokenizer.json")

    os.remove(directory / "merges.txt")
    with pytest.raises(OSError, match="merges.txt"):
        GroupViTTokenizer.from_pretrained(directory)
    (directory / "merges.txt").write_text("#version: 0.2\ni n\nthree symbols here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        GroupViTTokenizer.from_pretrained(directory)
    (directory / "merges.txt").write_text("#version: 0.2\nq# z@\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid BPE vocabulary"):
        GroupViTTokenizer.from_pretrained(directory)

    with pytest.raises(OSError, match="does not exist"):
        GroupViTTokenizer.from_pretrained(tmp_path / "missing")


def test_from_pretrained_without_tokenizer_files_uses_packaged_vocab(corpus, golden, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    loaded = GroupViTTokenizer.from_pretrained(tmp_path)
    np.testing.assert_array_equal(loaded(corpus[:100]).input_ids, golden["input_ids"][:100])


# ----- isolation -----
def test_import_loads_no_framework():
    code = (
        "import sys\n"
        "import groupvit_core.tokenizer as t\n"
        "t.GroupViTTokenizer()(['a photo of a cat'])\n"
        "frameworks = ('torch', 'tensorflow', 'keras', 'jax', 'transformers')\n"
        "print(','.join(sorted(m for m in frameworks if m in sys.modules)))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"groupvit_core.tokenizer imported {result.stdout.strip()}"
