"""db.immich_writer.tokenize_for_search against the cases of Immich's tokenizeForSearch (reference §2.1)."""

from __future__ import annotations

import pytest

from db.immich_writer import OcrLine, ocr_search_text, tokenize_for_search

# (input, the stored / queried string) — the table of immich-db-and-api.md §2.1, computed there with a
# faithful port of the TypeScript function.
REFERENCE_CASES = [
    ("增值税专用发票 No.12345", "增值 值税 税专 专用 用发 发票 No.12345"),
    ("发票", "发票"),
    ("中", "中"),
    ("Tokyo東京タワー", "Tokyo 東京 京タ タワ ワー"),
    ("한국어 텍스트", "한국 국어 텍스 스트"),
    ("发票，金额：100元", "发票 ， 金额 ：100 元"),
    ("ocr:发票", "ocr: 发票"),
]


@pytest.mark.parametrize(("text", "expected"), REFERENCE_CASES)
def test_reference_table(text: str, expected: str) -> None:
    assert " ".join(tokenize_for_search(text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("   \t\n", []),
        # only code units <= 0x20 separate: NBSP and the ideographic space are ordinary (non-CJK) characters
        ("a\u00a0b", ["a\u00a0b"]),
        ("发\u3000票", ["发", "\u3000", "票"]),
        # no case folding, punctuation kept verbatim
        ("Hello, World!", ["Hello,", "World!"]),
        # control characters separate like spaces
        ("a\x00b\x1fc", ["a", "b", "c"]),
        # CJK punctuation / full-width forms are not CJK: they split runs and become tokens
        ("北京。上海", ["北京", "。", "上海"]),
        # a character outside the BMP is a surrogate pair: two non-CJK code units, kept together
        ("𠀀字", ["𠀀", "字"]),
        ("a😀b", ["a😀b"]),
        # Hangul Jamo (U+1100..) is not in the Hangul syllable range
        ("\u1100\u1161", ["\u1100\u1161"]),
        # katakana prolonged sound mark and middle dot are inside the katakana block
        ("コーヒー・ラテ", ["コー", "ーヒ", "ヒー", "ー・", "・ラ", "ラテ"]),
        # Extension A and hiragana
        ("\u3400\u3401", ["\u3400\u3401"]),
        ("ひらがな", ["ひら", "らが", "がな"]),
        ("x中y", ["x", "中", "y"]),
    ],
)
def test_edge_cases(text: str, expected: list[str]) -> None:
    assert tokenize_for_search(text) == expected


def test_lone_surrogate_survives() -> None:
    # JavaScript strings can hold a lone surrogate; the port must not crash on one.
    assert tokenize_for_search("a\ud800b") == ["a\ud800b"]


def test_search_text_never_crosses_lines() -> None:
    box = (0.1, 0.1, 0.9, 0.1, 0.9, 0.2, 0.1, 0.2)
    lines = [OcrLine("北京", box, 0.9, 0.9), OcrLine("天安门", box, 0.9, 0.9), OcrLine("Gate 1", box, 0.9, 0.9)]
    # 京天 would only appear if the lines were concatenated first
    assert ocr_search_text(lines) == "北京 天安 安门 Gate 1"
