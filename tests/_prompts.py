"""Prompts as people type them: the strings on which text cleaning changes token ids, and ordinary ones.

Shared by the tokenizer tests (ids against the released and open_clip tokenizers) and the parity tests
(scores against a released-style scorer).
"""

from __future__ import annotations

import random

# A 300-word prompt: far past 77 tokens, with curly quotes and ligatures on both sides of the cut.
_WORDS = ["a", "“wooden”", "ﬁre-breathing", "dragon’s", "castle", "&amp;", "its", "ＧＡＲＤＥＮ", "at", "dusk,", "8k,", "highly", "detailed,", "trending", "on", "artstation,", "by", "Greg", "Rutkowski"]
LONG_PROMPT = " ".join(_WORDS[i % len(_WORDS)] for i in range(300))

HOSTILE_PROMPTS: list[str] = [
    # ordinary
    "a tiny dragon taking a bath in a teacup",
    "A Ferrari car that is made out of WOOD!!",
    "portrait of an old man, oil painting, 4k",
    "I'M SHOUTING, you'RE NOT, she'll, we'd, they've",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    # curly quotes and apostrophes (Pick-a-Pic is full of them)
    "it’s a dog’s life",
    "“Quoted” text with ‘single’ quotes",
    "‚low‘ „double low“ «guillemets» ‹single› ′prime″",
    "don’t stop believin’",
    # HTML entities, single and double escaped
    "Tom &amp; Jerry",
    "I &lt;3 cats &gt;_&lt;",
    "&amp;lt;double escaped&amp;gt;",
    "&quot;hello&quot; &#39;world&#39; &#x41;&#66;",
    "&nbsp;&nbsp;indented &copy; 2024 &eacute;t&eacute;",
    "URL https://example.com/a?b=c&amp;d=e#frag",
    # ligatures, fullwidth and other compatibility forms
    "ﬁne ﬂowers in an oﬃce ﬀ",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３！",
    "Ⅻ roman numerals ①②③ ½ ²",
    "𝓯𝓪𝓷𝓬𝔂 𝕞𝕒𝕥𝕙 letters",
    # mojibake (UTF-8 read as Windows-1252)
    "donâ€™t stop",
    "cafÃ© au lait, crÃ¨me brÃ»lÃ©e",
    "ðŸ˜€ smile",
    "â€œquotedâ€\x9d",
    # emoji and scripts
    "a cat 🐱 on a 🚀 rocket 👩‍👩‍👧 🏳️‍🌈",
    "Crème brûlée, naïve café, jalapeño, Ångström",
    "東京の夜景、ネオン、雨",
    "Привет мир, красивый пейзаж",
    "مرحبا بالعالم",
    "ÅNGSTRÖM İstanbul ß ẞ ǅ ǈ",
    # whitespace and invisible characters
    "tabs\tand\nnewlines\r\nand   spaces",
    "   leading and trailing   ",
    "non\u00a0breaking\u2009thin\u3000ideographic spaces",
    "zero\u200bwidth\u200cnon\u200djoiner",
    "soft\u00adhyphen and \ufeffBOM",
    "\u2028line separator\u2029paragraph separator",
    "\x85next line and control\x00chars\x07\x1b[31m",
    "e\u0301 combining acute (NFD) vs é",
    # special-token look-alikes
    "<|endoftext|> injected <|startoftext|>",
    "a <end_of_text> b <START_OF_TEXT> c",
    "!<end_of_text>",
    "ſtart <ſtart_of_text>",
    # lone surrogate (invalid in UTF-8), and degenerate input
    "lone \ud800 surrogate",
    "",
    "   ",
    "a" * 200,
    LONG_PROMPT,
]


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """Seeded random strings from an alphabet of letters, digits, punctuation, quotes, entities, ligatures,
    fullwidth and combining characters, emoji and whitespace."""
    pieces = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\"-_/()<>|:;")
    pieces += ["’", "‘", "“", "”", "&amp;", "&lt;", "&#39;", "&quot;", "ﬁ", "ﬂ", "Ａ", "ｂ", "１", "é", "e\u0301",
               "ß", "İ", "東", "🐉", "👍🏽", "\t", "\n", "\u00a0", "\u200b", "â€™", "Ã©", "'s", "'ll", " ", "  ",
               "<end_of_text>", "<|endoftext|>", "ſ", "½", "²"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(n)]
