"""runtime.tokenizer.ClipTokenizer against transformers' CLIPTokenizer on the real CLIP vocabulary."""

import importlib.util
import json
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from reference.architecture import CLIP_DIR
from runtime.tokenizer import ClipTokenizer, PromptTruncatedWarning
from tests.helpers import REPO

MAX_LENGTH = 77

LONG = (
    "a breathtaking matte painting of an ancient floating city above the clouds at golden hour, towering spires, "
    "waterfalls pouring into the void, flocks of birds, volumetric light, god rays, intricate architecture, "
    "highly detailed, sharp focus, concept art by a famous illustrator, trending on artstation, 8k resolution, "
    "unreal engine, octane render, cinematic composition, dramatic sky, vibrant colors, masterpiece"
)

PROMPTS = {
    "plain": [
        "a photo of a cat",
        "A photo of a dog",
        "an astronaut riding a horse on mars",
        "a red apple on a wooden table",
        "portrait of an old man with a beard",
        "the quick brown fox jumps over the lazy dog",
        "sunset over the ocean",
        "a bowl of soup",
        "cat",
        "a",
    ],
    "sd_style": [
        "(masterpiece:1.2), best quality, 1girl, solo",
        "((masterpiece)), (best quality:1.4), [lowres], {highres}",
        "a castle, (dramatic lighting:0.8), [[blurry]], ultra-detailed",
        "photo of a woman, (freckles:1.1), 85mm, f/1.8, bokeh",
        "landscape BREAK mountains BREAK river",
        "(cat:1.5) AND (dog:0.5)",
        "score_9, score_8_up, rating_safe, source_anime",
        "[dog:cat:0.5] in a field",
        "<lora:detail_tweaker:0.7> a city at night",
        "masterpiece,best quality,highres,,,",
        "hyperrealistic, 4k uhd, dslr, soft lighting, film grain, Fujifilm XT3",
        "oil painting::2 watercolor::-0.5",
        "embedding:EasyNegative, worst quality, low quality",
        "trending on artstation, by greg rutkowski and alphonse mucha",
        "Negative prompt: ugly, deformed, extra limbs",
    ],
    "punctuation": [
        "hello, world!",
        "what?! no...",
        "wait -- really?",
        "end.",
        "!!!",
        "?",
        "a;b:c",
        "quotes \"double\" and 'single'",
        "(parentheses) [brackets] {braces}",
        "@user #hashtag $100 %50 ^caret &and *star",
        "a/b\\c|d",
        "~tilde `backtick`",
        "...",
        "a.b.c",
        "e-mail: someone@example.com",
        "http://example.com/path?query=1&x=y",
        "C:\\Users\\name\\file.txt",
        "¡hola! ¿qué tal?",
        "«guillemets» „quotes“ “curly” ‘single’",
        "a — b – c",
    ],
    "digits": [
        "1girl",
        "8k",
        "2024",
        "3.14159",
        "1,000,000 stars",
        "-5 degrees",
        "1/2 cup of sugar",
        "version 2.0.1",
        "100% cotton",
        "0x1F",
        "1e-4",
        "room 101",
        "a 35mm photo",
        "24-70mm f2.8",
        "١٢٣ arabic digits",
        "½ ⅓ ² ³ ①",
        "phone 555-1234",
        "12:30 pm",
        "42",
        "0",
    ],
    "unicode": [
        "猫",
        "一只猫坐在桌子上",
        "東京の夜景",
        "ねこ と いぬ",
        "カタカナ",
        "고양이 사진",
        "кошка на диване",
        "Москва ЗИМОЙ",
        "γάτα στον ήλιο",
        "ΑΘΗΝΑ",
        "قطة على الطاولة",
        "बिल्ली की तस्वीर",
        "แมว",
        "חתול",
        "a cat 🐱 and a dog 🐶",
        "🔥🔥🔥",
        "👨‍👩‍👧‍👦 family",
        "🇯🇵 flag",
        "heart ❤️ symbol",
        "math ∑ ∫ √ ∞ ≈ ≠",
        "arrows → ← ↑ ↓",
        "© ® ™ ° ±",
        "mixed 猫cat кошка γάτα",
        "ﬁ ligature and ＦＵＬＬＷＩＤＴＨ",
        "𝔣𝔯𝔞𝔨𝔱𝔲𝔯 𝐛𝐨𝐥𝐝",
    ],
    "accents": [
        "café",
        "cafe\u0301",
        "naïve",
        "nai\u0308ve",
        "résumé",
        "re\u0301sume\u0301",
        "Ångström",
        "A\u030angstro\u0308m",
        "crème brûlée",
        "cre\u0300me bru\u0302le\u0301e",
        "São Paulo",
        "Sa\u0303o Paulo",
        "Zürich",
        "ÉCOLE",
        "E\u0301COLE",
        "piñata",
        "pin\u0303ata",
        "Dvořák",
        "Łódź",
        "ﬀ",
    ],
    "case": [
        "A PHOTO OF A CAT",
        "a PhOtO oF a CaT",
        "CamelCaseWord",
        "iPhone",
        "NASA",
        "DSLR",
        "Über",
        "İstanbul",
        "STRASSE straße",
        "ΣΊΣΥΦΟΣ",
    ],
    "whitespace": [
        "",
        " ",
        "   ",
        "\t",
        "\n",
        "  a photo of a cat  ",
        "a  photo   of    a cat",
        "a\tphoto\tof\ta\tcat",
        "a\nphoto\nof\na\ncat",
        "a\r\nphoto",
        "\n\n  leading newlines",
        "trailing tabs\t\t",
        "non\u00a0breaking space",
        "ideographic\u3000space",
        "em\u2003space",
        "vertical\x0btab and form\x0cfeed",
        "line\u2028separator",
        "zero\u200bwidth",
        "bom\ufeffinside",
        "nul\x00char",
    ],
    "apostrophes": [
        "it's a cat",
        "don't stop",
        "you're here",
        "we've got it",
        "I'm ready",
        "you'll see",
        "she'd know",
        "IT'S LOUD",
        "YOU'LL SEE",
        "the cat's toy",
        "rock 'n' roll",
        "'quoted'",
        "o'clock",
        "it’s curly",
        "dogs'",
        "'s",
        "''",
        "I'd've",
        "y'all",
        "'tis",
    ],
    "hyphens": [
        "well-known",
        "state-of-the-art",
        "ultra-detailed",
        "-leading hyphen",
        "trailing hyphen-",
        "double--hyphen",
        "sci‐fi",
        "x-ray",
        "t-shirt",
        "e-mail",
    ],
    "html": [
        "<b>bold</b>",
        "<div class=\"x\">text</div>",
        "&amp; &lt; &gt; &quot;",
        "&#39; &#x27;",
        "a <br/> b",
        "<img src='cat.png'>",
        "<!-- comment -->",
        "Tom &amp; Jerry",
        "<|endoftext|>",
        "<|startoftext|>a cat<|endoftext|>",
        "a <|endoftext|> b",
        "<|ENDOFTEXT|> upper",
        "<|StartOfText|> mixed",
        "<|endoftext",
        "</w>",
    ],
    "long": [
        LONG,
        LONG + ", " + LONG,
        "cat " * 75,
        "cat " * 76,
        "cat " * 200,
        " ".join(str(i) for i in range(100)),
        "!" * 300,
        "猫" * 100,
        "🐱" * 40,
        ", ".join(["(masterpiece:1.2)"] * 20),
    ],
}


def generated_prompts(count: int = 60, seed: int = 0) -> list[str]:
    """Deterministic mixtures of the fragments above, joined by varied separators."""
    rng = random.Random(seed)
    fragments = [p for name, group in PROMPTS.items() if name != "long" for p in group]
    separators = [" ", ", ", "  ", "\t", "\n", "", " - ", "|", ". "]
    prompts = []
    for _ in range(count):
        parts = rng.sample(fragments, rng.randint(2, 6))
        prompts.append(rng.choice(separators).join(parts))
    return prompts


PROMPTS["generated"] = generated_prompts()
ALL_PROMPTS = [p for group in PROMPTS.values() for p in group]


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return ClipTokenizer.from_dir(CLIP_DIR)


def reference_ids(hf_tokenizer, prompts: list[str]) -> np.ndarray:
    """What a diffusers SD pipeline feeds its text encoder."""
    out = hf_tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    return np.array(out["input_ids"], dtype=np.int64)


def mismatches(ours: ClipTokenizer, hf_tokenizer, prompts: list[str]) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        got = ours(prompts)
    want = reference_ids(hf_tokenizer, prompts)
    differ = np.flatnonzero((got != want).any(axis=1))
    return [f"{prompts[i]!r}: {got[i].tolist()} != {want[i].tolist()}" for i in differ]


def test_prompt_set_is_large_and_distinct():
    assert len(set(ALL_PROMPTS)) >= 200


def test_known_ids_of_the_real_vocabulary(ours):
    expected = [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = ours("a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, MAX_LENGTH)
    assert ids[0, :7].tolist() == expected
    assert (ids[0, 7:] == 49407).all()
    assert (ours.max_length, ours.bos_id, ours.eos_id, ours.pad_id) == (77, 49406, 49407, 49407)


@pytest.mark.parametrize("class_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
@pytest.mark.parametrize("group", list(PROMPTS))
def test_same_ids_as_transformers(ours, class_name, group):
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = getattr(transformers, class_name).from_pretrained(CLIP_DIR)
    bad = mismatches(ours, hf_tokenizer, PROMPTS[group])
    assert not bad, f"{len(bad)} of {len(PROMPTS[group])} prompts differ:\n" + "\n".join(bad[:5])


def test_batch_equals_one_at_a_time(ours):
    prompts = PROMPTS["unicode"] + PROMPTS["whitespace"]
    one_by_one = np.concatenate([ours(p) for p in prompts])
    np.testing.assert_array_equal(ours(prompts), one_by_one)


def test_empty_prompt_is_bos_eos_then_padding(ours):
    ids = ours("")[0]
    assert ids[:2].tolist() == [49406, 49407]
    assert (ids[2:] == ours.pad_id).all()
    assert ours([]).shape == (0, MAX_LENGTH)


def test_prompt_that_fills_the_context_is_not_truncated(ours):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        ids = ours("cat " * 75)[0]
    assert ids[0] == 49406 and ids[-1] == 49407
    assert (ids[1:-1] == 2368).all()


def test_truncation_keeps_bos_and_eos_and_warns_what_was_cut(ours):
    prompt = "cat " * 75 + "on a red sofa"
    with pytest.warns(PromptTruncatedWarning) as record:
        ids = ours(prompt)[0]
    assert len(record) == 1
    message = str(record[0].message)
    assert "4 prompt tokens were dropped" in message
    assert "up to 77 tokens" in message
    assert "'on a red sofa'" in message
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids[1:-1] == 2368).all()


def test_truncation_warning_quotes_a_short_excerpt_of_a_huge_prompt(ours):
    prompt = "cat " * 75 + "on a red sofa " + "blue " * 200_000  # a megabyte of prompt
    with pytest.warns(PromptTruncatedWarning) as record:
        ours(prompt)
    message = str(record[0].message)
    assert len(message) < 400 and "'on a red sofa blue blue" in message and "more tokens)" in message


def test_truncation_warns_once_per_long_prompt(ours):
    with pytest.warns(PromptTruncatedWarning) as record:
        ours(["short", "dog " * 80, "fine", "猫" * 100])
    assert len(record) == 2
    assert "5 prompt tokens were dropped" in str(record[0].message)


def test_rejects_non_string_prompts(ours):
    with pytest.raises(TypeError, match=r"a str or a list of str, got \['a cat', 3\]"):
        ours(["a cat", 3])
    with pytest.raises(TypeError, match="got None"):
        ours(None)


def write_folder(path: Path, special_tokens_map: dict | None, tokenizer_config: dict) -> Path:
    path.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(CLIP_DIR / name, path / name)
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if special_tokens_map is not None:
        (path / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return path


def sd2_style_folder(path: Path) -> Path:
    """SD 2.x's layout: special_tokens_map.json overrides the config's pad with "!" (id 0)."""
    config = json.loads((CLIP_DIR / "tokenizer_config.json").read_text())
    special = json.loads((CLIP_DIR / "special_tokens_map.json").read_text())
    return write_folder(path, {**special, "pad_token": "!"}, config)


def saved_by_transformers4_folder(path: Path) -> Path:
    """The newer layout: flags in tokenizer_config.json's added_tokens_decoder, special_tokens_map unread."""
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {
            "0": {"content": "!", "normalized": False, **flags},
            "49406": {"content": "<|startoftext|>", "normalized": True, **flags},
            "49407": {"content": "<|endoftext|>", "normalized": True, **flags},
        },
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    return write_folder(path, {"pad_token": "<|endoftext|>"}, config)


@pytest.mark.parametrize("make_folder", [sd2_style_folder, saved_by_transformers4_folder])
def test_pad_token_bang_from_config(tmp_path, make_folder):
    folder = make_folder(tmp_path / "tokenizer")
    tokenizer = ClipTokenizer.from_dir(folder)
    assert tokenizer.pad_id == 0
    # A special "!" is split off before BPE, so "!!" is two id-0 tokens rather than the merged "!!</w>".
    ids = tokenizer(["hello!!", "a cat"])
    assert ids[0, :6].tolist() == [49406, 3306, 0, 0, 49407, 0]
    assert ids[1, :5].tolist() == [49406, 320, 2368, 49407, 0]
    assert (ids[:, 5:] == 0).all()
    transformers = pytest.importorskip("transformers")
    prompts = PROMPTS["punctuation"] + PROMPTS["sd_style"] + PROMPTS["html"] + PROMPTS["long"]
    assert not mismatches(tokenizer, transformers.CLIPTokenizer.from_pretrained(folder), prompts)


def test_max_length_from_config(tmp_path):
    folder = write_folder(tmp_path / "tokenizer", None, {"model_max_length": 16})
    tokenizer = ClipTokenizer.from_dir(folder)
    assert tokenizer("a photo of a cat").shape == (1, 16)
    with pytest.warns(PromptTruncatedWarning, match="up to 16 tokens"):
        assert tokenizer("cat " * 20)[0, -1] == 49407


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_missing_file_names_it(tmp_path, missing):
    folder = write_folder(tmp_path / "tokenizer", None, {})
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing} is missing: the tokenizer bundle is incomplete"):
        ClipTokenizer.from_dir(folder)


def test_pad_token_outside_vocabulary_is_a_clear_error(tmp_path):
    folder = write_folder(tmp_path / "tokenizer", {"pad_token": "<pad>"}, {})
    with pytest.raises(ValueError, match="'<pad>' is not in the vocabulary"):
        ClipTokenizer.from_dir(folder)


def test_clip_vocab_follows_from_its_merges():
    spec = importlib.util.spec_from_file_location("derive_vocab", CLIP_DIR / "derive_vocab.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    lines = (CLIP_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merges = [tuple(line.split()) for line in lines[1:]]
    vocab = json.loads((CLIP_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert derive.build_vocab(merges) == vocab
    assert (len(vocab), vocab["!"], vocab["!</w>"], vocab["<|endoftext|>"]) == (49408, 0, 256, 49407)


def test_import_and_use_without_torch_or_transformers():
    code = (
        "import sys\n"
        "from runtime.tokenizer import ClipTokenizer\n"
        f"ClipTokenizer.from_dir({str(CLIP_DIR)!r})('a photo of a cat')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_unset_model_max_length_is_a_clear_error(tmp_path):
    folder = write_folder(tmp_path / "tokenizer", None, {"model_max_length": int(1e30)})
    with pytest.raises(ValueError, match="set model_max_length in tokenizer_config.json"):
        ClipTokenizer.from_dir(folder)
