"""Write the tokenizer golden files from transformers' CLIPTokenizerFast (the reference), then cross-check.

Run with the reference environment (transformers 4.57.6), from the repository root:

    /work/refvenv/bin/python tools/make_tokenizer_golden.py            # write goldens, then cross-check
    /work/refvenv/bin/python tools/make_tokenizer_golden.py --check-only

Steps:
1. Build the test corpus deterministically (hand-written cases plus a seeded expansion) and write it to
   tests/golden/tokenizer_corpus.json.
2. Write vocab.json / merges.txt from groupvit_core/assets/bpe_simple_vocab_16e6.txt.gz with an independent
   implementation of OpenAI CLIP's vocabulary construction (not groupvit_core's), load them with
   CLIPTokenizerFast(pad_token="<|endoftext|>") and tokenize the corpus.
3. Save the reference ids to tests/golden/tokenizer_ids.npz (see GOLDEN_KEYS below) and the reference
   tokenizer.json layout, with its vocabulary and merges emptied, to tests/golden/tokenizer_hf_layout.json.
4. Cross-check groupvit_core.tokenizer against the reference: the same ids, its save_pretrained output read
   by CLIPTokenizerFast / CLIPTokenizer, and a directory saved by transformers read by from_pretrained.
   This step prints a report and exits non-zero on a mismatch; it never changes the golden files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import unicodedata

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(ROOT, "groupvit_core", "assets", "bpe_simple_vocab_16e6.txt.gz")
GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")
CORPUS_PATH = os.path.join(GOLDEN_DIR, "tokenizer_corpus.json")
IDS_PATH = os.path.join(GOLDEN_DIR, "tokenizer_ids.npz")
LAYOUT_PATH = os.path.join(GOLDEN_DIR, "tokenizer_hf_layout.json")

MAX_LENGTH = 77
SHORT_MAX_LENGTH = 16
SEED = 20240611
MIN_CORPUS = 1000
GOLDEN_KEYS = """
input_ids, attention_mask      (N, 77) padding="max_length", max_length=77, truncation=True
input_ids_16, attention_mask_16 (N, 16) the same with max_length=16
full_ids, full_offsets         flat ids of truncation=False, padding=False; row i = full_ids[off[i]:off[i+1]]
longest_index_K, longest_ids_K, longest_mask_K  padding="longest", max_length=77, truncation=True on corpus[index]
decoded_utf8, decoded_offsets  decode(input_ids[i], skip_special_tokens=True), UTF-8 bytes
decoded_special_utf8, decoded_special_offsets  decode(unpadded input_ids[i], skip_special_tokens=False)
reference                      the transformers / tokenizers versions that produced the file
"""

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]
CONTEXT_CLASSES = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
]
# The spaced spellings GroupViT's segmentation prompts use for the run-together VOC/Context names.
SPACED_NAMES = ["aero plane", "dining table", "motor bike", "potted plant", "tv monitor", "bed clothes", "background"]
TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a pixelated photo of the {}.",
    "itap of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a toy {}.",
    "the origami {}.", "a photo of a large {}.", "a photo of a small {}.", "art of the {}.", "a plushie {}.",
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
]
CAPTIONS = [
    "a photo of a cat", "a photo of a dog", "two cats sleeping on a pink blanket next to remote controls.",
    "A man riding a wave on top of a surfboard.", "A kitchen with wooden cabinets and a white refrigerator.",
    "a group of people standing around a table with food", "An old red double-decker bus driving down a street",
    "Giraffes grazing in the savanna at sunset", "a plate of spaghetti with meatballs and basil",
    "Close-up of a bee on a sunflower", "The Eiffel Tower at night, lit up in gold",
    "a child flying a kite on the beach", "a bowl of fruit: apples, bananas and oranges",
    "Snow-covered mountains reflected in a calm lake", "a black-and-white photo of a vintage car",
    "A laptop, a cup of coffee and a notebook on a desk", "Two zebras drinking from a river",
    "an aerial view of a city at dusk", "A teddy bear sitting on a bed", "a stop sign at an intersection",
    "people walking in the rain with umbrellas", "a bicycle leaning against a brick wall",
    "A pizza with pepperoni, olives & mushrooms", "a train crossing a bridge over a canyon",
    "Sheep grazing on a green hillside in Scotland", "A woman holding a tennis racket on a clay court",
    "a horse-drawn carriage in Central Park", "a toilet and a sink in a small bathroom",
    "a cow standing in a field of tall grass", "boats docked in a harbor at sunrise",
    "Fireworks over the Sydney Opera House on New Year's Eve", "a person skiing down a steep slope",
    "the quick brown fox jumps over the lazy dog", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "A close up of a plate of food with broccoli", "an elephant walking through the jungle",
    "A living room with a couch, a TV and a potted plant", "a traffic light turned red on a busy road",
    "a dog catching a frisbee in mid-air", "a man in a suit and tie talking on a cell phone",
    "Kids playing baseball in the park; one is holding a bat.", "a vase of tulips on a window sill",
    "A clock tower with a blue sky behind it", "a polar bear swimming in icy water",
    "a skateboarder doing a kickflip at a skate park", "oven-roasted vegetables on a baking tray",
    "a fire hydrant painted yellow on the sidewalk", "a bench under a tree in autumn",
    "A handbag and a suitcase at an airport", "a microwave above a stove in a kitchen",
    "pictured: the 2019 model (in red)", "photo by @someone on 12/03/2021", "Image #42 of 100",
    "rainy day in new york city #nyc #rain", "sunset vibes 🌅🌴 #travel", "my cat 😺 loves boxes!!!",
    "A 1950's diner with neon lights", "Mount Everest, 8,848.86 m above sea level",
]
EDGE_CASES = [
    # empty and whitespace
    "", " ", "  ", "\t", "\n", "\r\n", "\n\n\n", " \t \n ", "a   b", "a\tb", "a\nb", "a\r\nb", "  leading",
    "trailing  ", "  both  ", "tabs\t\tand\t\tspaces  here", "line one\nline two\nline three",
    "para one\n\npara two", "a\u00a0b", "a\u2003b", "a\u3000b", "a\u200bb", "a\u2028b", "\u00a0\u00a0nbsp",
    "a\x0bb\x0cc", "a\x85b",
    # punctuation
    "hello, world!", "hello,world", "...", "!!!", "???", "?!", "a-b", "a_b", "a--b", "a—b", "a–b", "(a) [b] {c}",
    "<tag>", "</w>", "a</w>b", "'quoted'", '"double quoted"', "«guillemets»", "“curly quotes”", "‘single curly’",
    "e-mail: someone@example.com", "https://example.com/path?q=1&x=2#frag", "C:\\Users\\photo.jpg",
    "#hashtag", "@user", "$5.99", "€10", "£3", "¥500", "50%", "100 %", "C++", "C#", "a/b/c", "a|b|c", "~tilde~",
    "*bold*", "_italic_", "`code`", "a;b:c", "2+2=4", "x^2", "a & b", "a && b || c", "<<>>", "@#$%^&*()",
    # numbers
    "0", "7", "42", "1234567890", "3.14159", "-12", "+1", "1,000,000", "1.000.000", "1e10", "0x1F", "2nd", "3rd",
    "4th", "21st century", "10:30pm", "10:30 PM", "2021-03-12", "12/03/2021", "1/2", "½", "²", "٣", "४२",
    "Ⅻ", "①②③", "１２３", "１２３ａｂｃ",
    # contractions
    "don't", "it's", "we'll", "i'm", "you're", "they've", "he'd", "can't", "won't", "isn't", "y'all",
    "DON'T", "It'S", "WE'LL", "I'M", "You'Re", "THEY'VE", "HE'D", "don’t", "it’s", "rock 'n' roll", "'s", "'t",
    "the dog's bone", "the dogs' bones", "o'clock", "'twas", "ma'am", "''", "'''s",
    # accents and normalisation
    "café", "naïve", "résumé", "Zoë", "São Paulo", "Ångström", "façade", "jalapeño", "crème brûlée", "Málaga",
    "cafe\u0301", "nai\u0308ve", "CAFÉ", "ÉCOLE", "Ærø", "Øresund", "straße", "STRASSE", "İstanbul", "ıi",
    "ΣΑΣ", "Σίσυφος", "ﬁne", "ﬂower", "Ⓐⓑⓒ", "ｆｕｌｌｗｉｄｔｈ",
    # emoji
    "🐱", "🐶🐶", "👍", "👍🏽", "👨‍👩‍👧", "🇫🇷", "🇯🇵🇺🇸", "❤️", "❤", "✨ sparkle ✨", "😀😃😄😁", "a🐱b", "cat🐱",
    "🐱cat", "🏳️‍🌈", "☕ coffee", "©2021", "™", "®",
    # scripts
    "猫", "一只猫的照片", "猫の写真", "ねこ", "ネコ", "고양이 사진", "кошка", "Фотография кошки", "γάτα",
    "قطة", "חתול", "बिल्ली", "แมว", "mèo", "kedi", "Katze", "chat noir", "gatto", "漢字とカタカナ mixed",
    "中文, English, 日本語", "ลองภาษาไทย",
    # case
    "A PHOTO OF A CAT", "a Photo Of A Cat", "CamelCaseWord", "iPhone", "eBay", "McDonald's", "NASA", "mIxEd CaSe",
    # special tokens inside text
    "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "<|startoftext|>a photo<|endoftext|>",
    "<|ENDOFTEXT|>", "< |endoftext| >", "<|endoftext", "|endoftext|>", "<|endoftext|><|endoftext|>",
    # control and odd characters
    "\x00", "a\x00b", "\x07bell", "\x1b[31mred\x1b[0m", "\x7f", "\ufffd", "\ufeffbom", "a\u00adb", "\u2060",
    "\U0001d400\U0001d401", "\U00010348", "\U000e0041",
]
LONG_WORDS = (
    "the a photo of picture image cat dog person car tree sky water street city building red blue green small "
    "large old young running sitting standing two three many with on in at near under beside and or but"
).split()


def build_corpus() -> list:
    rng = random.Random(SEED)
    class_names = list(dict.fromkeys(VOC_CLASSES + COCO_CLASSES + CONTEXT_CLASSES + SPACED_NAMES))
    corpus = []
    corpus += class_names
    corpus += [f"a photo of a {name}." for name in class_names]
    corpus += [TEMPLATES[i % len(TEMPLATES)].format(name) for i, name in enumerate(class_names)]
    corpus += [TEMPLATES[(7 * i + 3) % len(TEMPLATES)].format(name) for i, name in enumerate(class_names)]
    corpus += [name.upper() for name in class_names[::3]] + [name.title() for name in class_names[1::3]]
    corpus += CAPTIONS + EDGE_CASES
    corpus += [unicodedata.normalize("NFD", text) for text in EDGE_CASES if unicodedata.normalize("NFD", text) != text]

    # Over-long texts: everything past 75 tokens must be cut with <|endoftext|> last.
    corpus += [" ".join(CAPTIONS[i : i + 12]) for i in range(0, len(CAPTIONS), 6)]
    corpus += [" ".join(rng.choice(LONG_WORDS) for _ in range(n)) for n in (74, 75, 76, 77, 78, 100, 150, 300)]
    corpus += ["cat " * n for n in (74, 75, 76, 77, 200)]
    corpus += ["1234567890" * n for n in (7, 8, 30)]
    corpus += ["🐱" * n for n in (20, 40, 80)]  # multi-token emoji cut mid-character
    corpus += ["👨‍👩‍👧" * 30, "猫" * 100, "一只猫的照片，" * 20, "!?" * 100, "don't " * 40, "café naïve " * 40]
    corpus += ["word\t\t\n  " * 60, ("a photo of a cat. " * 30).strip(), "x" * 1000, "ab" * 700]

    # Seeded expansion: fragments from every pool, joined with varied separators and case.
    pools = [class_names, CAPTIONS, EDGE_CASES, TEMPLATES, LONG_WORDS]
    separators = [" ", "  ", "\t", "\n", ", ", ". ", " - ", "/", "", " \u00a0 ", "! ", "'s ", "?"]
    cases = [str, str, str, str.upper, str.title, str.swapcase, str.lower]
    while len(dict.fromkeys(corpus)) < MIN_CORPUS + 150:
        count = rng.randint(1, 6)
        parts = [rng.choice(rng.choice(pools)) for _ in range(count)]
        text = rng.choice(separators).join(parts)
        text = rng.choice(cases)(text)
        if rng.random() < 0.2:
            text = rng.choice(["", " ", "  ", "\n"]) + text + rng.choice(["", " ", ".", "!", "\t"])
        if rng.random() < 0.1:
            text = text.replace("{}", rng.choice(class_names))
        corpus.append(text)
    corpus = list(dict.fromkeys(corpus))
    for text in corpus:
        text.encode("utf-8")  # fails on lone surrogates, which no tokenizer can take
    return corpus


def clip_vocab_files(directory: str) -> tuple:
    """vocab.json / merges.txt as OpenAI CLIP's SimpleTokenizer builds its vocabulary."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    with gzip.open(ASSET, "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == len(set(tokens)) == 49408, len(tokens)
    vocab_path = os.path.join(directory, "vocab.json")
    merges_path = os.path.join(directory, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as handle:
        json.dump({token: index for index, token in enumerate(tokens)}, handle, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def reference_tokenizer(directory: str):
    from transformers import CLIPTokenizerFast

    vocab_path, merges_path = clip_vocab_files(directory)
    return CLIPTokenizerFast(vocab_path, merges_path, pad_token="<|endoftext|>")


def longest_batches(corpus: list) -> list:
    n = len(corpus)
    long_ones = [i for i, text in enumerate(corpus) if len(text) > 300][:5]
    return [
        list(range(0, 8)),
        list(range(n - 9, n)),
        [corpus.index("")],
        [corpus.index(""), corpus.index("a photo of a cat"), corpus.index("🐱")],
        list(range(200, 240, 3)) + long_ones,
        list(range(0, n, 97)),
    ]


def pack_strings(texts: list) -> tuple:
    blobs = [text.encode("utf-8") for text in texts]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(), offsets


def reference_outputs(tok, corpus: list) -> dict:
    import tokenizers
    import transformers

    out = {}
    enc = tok(corpus, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np")
    out["input_ids"] = enc["input_ids"].astype(np.int32)
    out["attention_mask"] = enc["attention_mask"].astype(np.uint8)
    enc16 = tok(corpus, padding="max_length", max_length=SHORT_MAX_LENGTH, truncation=True, return_tensors="np")
    out["input_ids_16"] = enc16["input_ids"].astype(np.int32)
    out["attention_mask_16"] = enc16["attention_mask"].astype(np.uint8)
    full = tok(corpus, padding=False, truncation=False)["input_ids"]
    out["full_ids"] = np.concatenate([np.asarray(row, dtype=np.int32) for row in full])
    out["full_offsets"] = np.concatenate([[0], np.cumsum([len(row) for row in full])]).astype(np.int64)
    for k, index in enumerate(longest_batches(corpus)):
        batch = tok([corpus[i] for i in index], padding="longest", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="np")
        out[f"longest_index_{k}"] = np.asarray(index, dtype=np.int64)
        out[f"longest_ids_{k}"] = batch["input_ids"].astype(np.int32)
        out[f"longest_mask_{k}"] = batch["attention_mask"].astype(np.uint8)
    decoded = tok.batch_decode(enc["input_ids"].tolist(), skip_special_tokens=True)
    out["decoded_utf8"], out["decoded_offsets"] = pack_strings(decoded)
    unpadded = [row[mask.astype(bool)].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
    decoded_special = tok.batch_decode(unpadded, skip_special_tokens=False)
    out["decoded_special_utf8"], out["decoded_special_offsets"] = pack_strings(decoded_special)
    out["reference"] = np.asarray(
        f"transformers {transformers.__version__} CLIPTokenizerFast, tokenizers {tokenizers.__version__}"
    )
    return out


def write_goldens(corpus: list, outputs: dict, layout: dict) -> None:
    sys.path.insert(0, ROOT)
    from groupvit_core.io_utils import atomic_path, atomic_write_text

    os.makedirs(GOLDEN_DIR, exist_ok=True)
    atomic_write_text(CORPUS_PATH, json.dumps(corpus, ensure_ascii=False, indent=0) + "\n")
    with atomic_path(IDS_PATH) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **outputs)
    atomic_write_text(LAYOUT_PATH, json.dumps(layout, ensure_ascii=False, indent=2) + "\n")


def hf_layout(tok, directory: str) -> dict:
    """The reference tokenizer.json with model.vocab and model.merges emptied (tests refill them)."""
    tok.save_pretrained(directory)
    with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as handle:
        layout = json.load(handle)
    layout["model"]["vocab"] = {}
    layout["model"]["merges"] = []
    return layout


def cross_check(corpus: list, reference: dict) -> int:
    """Compare groupvit_core.tokenizer with the reference; returns the number of failures."""
    sys.path.insert(0, ROOT)
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

    from groupvit_core.tokenizer import GroupViTTokenizer

    failures = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail and not ok else ''}")

    ours = GroupViTTokenizer()
    with tempfile.TemporaryDirectory() as work:
        vocab_path, merges_path = clip_vocab_files(work)
        with open(vocab_path, encoding="utf-8") as handle:
            check("packaged vocabulary == CLIP's (every token and id)", ours.get_vocab() == json.load(handle))
        ours_dir = os.path.join(work, "ours")
        ours.save_pretrained(ours_dir)
        with open(merges_path, encoding="utf-8") as theirs, \
                open(os.path.join(ours_dir, "merges.txt"), encoding="utf-8") as mine:
            check("save_pretrained merges.txt == CLIP's merges", theirs.read() == mine.read())
    got = ours(corpus)
    bad = np.flatnonzero((got.input_ids != reference["input_ids"]).any(axis=1))
    check("GroupViTTokenizer() ids == CLIPTokenizerFast on corpus", bad.size == 0,
          f"{bad.size} rows differ, first {[corpus[i] for i in bad[:3]]!r}")

    with tempfile.TemporaryDirectory() as saved:
        ours.save_pretrained(saved)
        fast = CLIPTokenizerFast.from_pretrained(saved)
        ids = fast(corpus, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np")
        check("CLIPTokenizerFast.from_pretrained(save_pretrained dir) ids",
              np.array_equal(ids["input_ids"], reference["input_ids"]))
        check("  its model_max_length == 77", fast.model_max_length == MAX_LENGTH, str(fast.model_max_length))
        auto = AutoTokenizer.from_pretrained(saved)
        ids = auto(corpus, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np")
        check(f"AutoTokenizer ({type(auto).__name__}) ids", np.array_equal(ids["input_ids"], got.input_ids))
        slow = CLIPTokenizer.from_pretrained(saved)
        captions = [text for text in CAPTIONS if text.isascii()]
        ids = slow(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np")
        check("CLIPTokenizer (slow) on ASCII captions", np.array_equal(ids["input_ids"], ours(captions).input_ids))

    with tempfile.TemporaryDirectory() as work:
        hf_dir = os.path.join(work, "hf")
        reference_tokenizer(work).save_pretrained(hf_dir)
        loaded = GroupViTTokenizer.from_pretrained(hf_dir)
        check("GroupViTTokenizer.from_pretrained(transformers dir with tokenizer.json) ids",
              np.array_equal(loaded(corpus).input_ids, reference["input_ids"]))
        os.remove(os.path.join(hf_dir, "tokenizer.json"))
        loaded = GroupViTTokenizer.from_pretrained(hf_dir)
        check("GroupViTTokenizer.from_pretrained(vocab.json + merges.txt) ids",
              np.array_equal(loaded(corpus).input_ids, reference["input_ids"]))
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-only", action="store_true", help="cross-check against the committed corpus only")
    parser.add_argument("--no-check", action="store_true", help="write the golden files without cross-checking")
    args = parser.parse_args()

    if args.check_only:
        with open(CORPUS_PATH, encoding="utf-8") as handle:
            corpus = json.load(handle)
    else:
        corpus = build_corpus()
    with tempfile.TemporaryDirectory() as work:
        tok = reference_tokenizer(work)
        outputs = reference_outputs(tok, corpus)
        layout = hf_layout(tok, os.path.join(work, "saved"))
    truncated = int((outputs["full_offsets"][1:] - outputs["full_offsets"][:-1] > MAX_LENGTH).sum())
    print(f"corpus: {len(corpus)} strings, {truncated} longer than {MAX_LENGTH} tokens; {outputs['reference']}")
    if not args.check_only:
        write_goldens(corpus, outputs, layout)
        print(f"wrote {CORPUS_PATH}, {IDS_PATH}, {LAYOUT_PATH}")
    if args.no_check:
        return 0
    failures = cross_check(corpus, outputs)
    print("cross-check passed" if failures == 0 else f"cross-check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
