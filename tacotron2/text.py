"""Text front end of NVIDIA's Tacotron2: the 148-symbol table, `english_cleaners`, text <-> ids.

A checkpoint's embedding rows are indexed by this table, so the table and the cleaners have to
match NVIDIA's (NVIDIA/tacotron2 `text/`, after keithito/tacotron) symbol for symbol, or a published
`tacotron2_statedict.pt` reads the wrong rows. `text_to_sequence` reproduces theirs exactly (the
fixture `english_cleaners_text_to_sequence` pins it), with three deliberate differences:

- ASCII transliteration is `unidecode`'s, as in NVIDIA's `convert_to_ascii` (Cyrillic, Greek and CJK become
  Latin letters rather than vanishing); no `inflect` dependency: numbers are spelled out here (the same words
  inflect gives, for every number inflect accepts);
- '£' survives transliteration so that "£5" becomes "five pounds" (unidecode turned it into "PS",
  which made NVIDIA's own pound rule dead code), and a number too large for inflect is read digit by
  digit instead of raising;
- ARPAbet in braces may span lines.

Like NVIDIA's, no end-of-sequence token is appended, and characters outside the table are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from unidecode import unidecode

from utils import UserError

# ---------------------------------------------------------------------------------------------
# Symbols
# ---------------------------------------------------------------------------------------------

# CMUdict's phoneme set (vowels with stress 0/1/2 and unstressed), in NVIDIA's order.
_ARPABET = (
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 "
    "B CH D DH EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 "
    "JH K L M N NG OW OW0 OW1 OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 "
    "V W Y Z ZH"
).split()

_PAD = "_"
_SPECIAL = "-"
_PUNCTUATION = "!'(),.:;? "
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

#: NVIDIA's table: pad, '-', punctuation, letters, then '@'-prefixed ARPAbet (148 entries).
symbols: list[str] = [_PAD, *_SPECIAL, *_PUNCTUATION, *_LETTERS, *("@" + s for s in _ARPABET)]

_symbol_to_id = {s: i for i, s in enumerate(symbols)}
_id_to_symbol = dict(enumerate(symbols))


# ---------------------------------------------------------------------------------------------
# Numbers to words (what `inflect.number_to_words` returns, as NVIDIA's cleaners call it)
# ---------------------------------------------------------------------------------------------

_UNITS = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
          "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ["", "thousand", "million", "billion", "trillion", "quadrillion", "quintillion", "sextillion",
           "septillion", "octillion", "nonillion", "decillion"]
_DIGITS = ["zero", *_UNITS[1:]]
_ORDINAL_ENDINGS = {"ty": "tieth", "one": "first", "two": "second", "three": "third", "five": "fifth",
                    "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}


def _below_hundred(n: int) -> str:
    if n < 10:
        return _UNITS[n]
    if n < 20:
        return _TEENS[n - 10]
    tens, units = divmod(n, 10)
    return _TENS[tens] + ("-" + _UNITS[units] if units else "")


def _below_thousand(n: int, andword: str) -> str:
    hundreds, rest = divmod(n, 100)
    if not hundreds:
        return _below_hundred(rest)
    words = f"{_UNITS[hundreds]} hundred"
    if rest:
        words += f" {andword} " if andword else " "
        words += _below_hundred(rest)
    return words


def cardinal(n: int, andword: str = "") -> str:
    """`n` (>= 0) in words, e.g. 1234 -> "one thousand, two hundred thirty-four" (andword="").

    Follows inflect: groups of three digits joined by ", ", except that a last group below one
    hundred is joined by the `andword` ("one thousand and five"), and no comma inside a group.
    """
    if n == 0:
        return "zero"
    groups = []
    while n:
        n, group = divmod(n, 1000)
        groups.append(group)
    if len(groups) > len(_SCALES):
        # inflect raises beyond decillions (and so did NVIDIA's cleaner); read the digits instead.
        return " ".join(_DIGITS[int(d)] for d in str(sum(g * 1000 ** i for i, g in enumerate(groups))))
    chunks = [(_below_thousand(g, andword) + (" " + _SCALES[i] if i else ""), i, g)
              for i, g in reversed(list(enumerate(groups))) if g]
    words = ", ".join(text for text, _, _ in chunks[:-1])
    last_text, last_scale, last_group = chunks[-1]
    if not words:
        return last_text
    if last_scale == 0 and last_group < 100:
        return f"{words} {andword} {last_text}" if andword else f"{words} {last_text}"
    return f"{words}, {last_text}"


def ordinal(n: int) -> str:
    """`n` (>= 0) as an ordinal, e.g. 101 -> "one hundred and first" (inflect's default andword)."""
    words = cardinal(n, andword="and")
    for ending, replacement in _ORDINAL_ENDINGS.items():
        if words.endswith(ending):
            return words[: -len(ending)] + replacement
    return words + "th"


def _year_style(n: int) -> str:
    # 1000 < n < 3000, not a whole hundred, not 2001..2009: read as two pairs ("nineteen oh five").
    high, low = divmod(n, 100)
    low_words = _below_hundred(low) if low >= 10 else f"oh {_UNITS[low]}"
    return f"{_below_hundred(high)} {low_words}"


_comma_number_re = re.compile(r"([0-9][0-9,]+[0-9])")
_decimal_number_re = re.compile(r"([0-9]+\.[0-9]+)")
_pounds_re = re.compile(r"£([0-9,]*[0-9]+)")
_dollars_re = re.compile(r"\$([0-9.,]*[0-9]+)")
_ordinal_re = re.compile(r"[0-9]+(st|nd|rd|th)")
_number_re = re.compile(r"[0-9]+")


def _expand_dollars(m: re.Match) -> str:
    amount = m.group(1)
    parts = amount.split(".")
    if len(parts) > 2:
        return amount + " dollars"  # not an amount we understand: leave the digits to the number rules
    dollars = int(parts[0]) if parts[0] else 0
    cents = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    dollar_unit = "dollar" if dollars == 1 else "dollars"
    cent_unit = "cent" if cents == 1 else "cents"
    if dollars and cents:
        return f"{dollars} {dollar_unit}, {cents} {cent_unit}"
    if dollars:
        return f"{dollars} {dollar_unit}"
    if cents:
        return f"{cents} {cent_unit}"
    return "zero dollars"


def _expand_number(m: re.Match) -> str:
    n = int(m.group(0))
    if 1000 < n < 3000:
        # Years: "nineteen ninety-nine", "two thousand five", "twenty ten", "fifteen hundred".
        if n == 2000:
            return "two thousand"
        if 2000 < n < 2010:
            return "two thousand " + cardinal(n % 100)
        if n % 100 == 0:
            return cardinal(n // 100) + " hundred"
        return _year_style(n)
    return cardinal(n)


def normalize_numbers(text: str) -> str:
    """Spell out numbers, amounts of money, ordinals and decimals (NVIDIA's order of rules)."""
    text = _comma_number_re.sub(lambda m: m.group(1).replace(",", ""), text)
    text = _pounds_re.sub(r"\1 pounds", text)
    text = _dollars_re.sub(_expand_dollars, text)
    text = _decimal_number_re.sub(lambda m: m.group(1).replace(".", " point "), text)
    text = _ordinal_re.sub(lambda m: ordinal(int(m.group(0)[:-2])), text)
    return _number_re.sub(_expand_number, text)


# ---------------------------------------------------------------------------------------------
# Cleaners
# ---------------------------------------------------------------------------------------------

_whitespace_re = re.compile(r"\s+")

_abbreviations = [(re.compile(rf"\b{abbreviation}\.", re.IGNORECASE), expansion) for abbreviation, expansion in [
    ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"),
    ("jr", "junior"), ("maj", "major"), ("gen", "general"), ("drs", "doctors"), ("rev", "reverend"),
    ("lt", "lieutenant"), ("hon", "honorable"), ("sgt", "sergeant"), ("capt", "captain"),
    ("esq", "esquire"), ("ltd", "limited"), ("col", "colonel"), ("ft", "fort"),
]]


def convert_to_ascii(text: str) -> str:
    """Transliterate to ASCII with unidecode, as NVIDIA's front end does, except that '£' is kept so that the pound
    rule of `normalize_numbers` can see it."""
    return "£".join(unidecode(part) for part in text.split("£"))


def expand_abbreviations(text: str) -> str:
    for pattern, expansion in _abbreviations:
        text = pattern.sub(expansion, text)
    return text


def collapse_whitespace(text: str) -> str:
    # Leading and trailing spaces stay (as in NVIDIA's): they are symbols the model was trained on.
    return _whitespace_re.sub(" ", text)


def basic_cleaners(text: str) -> str:
    """Lowercase and collapse whitespace, nothing else (for non-English text)."""
    return collapse_whitespace(text.lower())


def transliteration_cleaners(text: str) -> str:
    """ASCII, lowercase, collapsed whitespace: non-English text in Latin script."""
    return collapse_whitespace(convert_to_ascii(text).lower())


def english_cleaners(text: str) -> str:
    """NVIDIA's English pipeline: ASCII, lowercase, numbers, abbreviations, whitespace."""
    text = convert_to_ascii(text).lower()
    text = normalize_numbers(text)
    text = expand_abbreviations(text)
    return collapse_whitespace(text)


CLEANERS: dict[str, Callable[[str], str]] = {
    "english_cleaners": english_cleaners,
    "basic_cleaners": basic_cleaners,
    "transliteration_cleaners": transliteration_cleaners,
}


def clean_text(text: str, cleaners: Iterable[str] = ("english_cleaners",)) -> str:
    if isinstance(cleaners, str):  # a lone name, not a sequence of its characters
        cleaners = (cleaners,)
    for name in cleaners:
        if name not in CLEANERS:
            raise UserError(f"unknown text cleaner {name!r}; choose from {', '.join(CLEANERS)}")
        text = CLEANERS[name](text)
    return text


# ---------------------------------------------------------------------------------------------
# Text <-> symbol ids
# ---------------------------------------------------------------------------------------------

# Text, then ARPAbet in braces, then the rest; DOTALL so that braces after a newline still count.
_curly_re = re.compile(r"(.*?)\{(.+?)\}(.*)", re.DOTALL)


def _symbols_to_sequence(chars: Iterable[str]) -> list[int]:
    # The pad symbol is never produced from text: it only fills batches.
    return [_symbol_to_id[s] for s in chars if s in _symbol_to_id and s != _PAD]


def text_to_sequence(text: str, cleaners: Sequence[str] = ("english_cleaners",)) -> list[int]:
    """Symbol ids of `text` after `cleaners`; "{HH AH0 L OW1}" passes through as ARPAbet symbols.

    Identical to NVIDIA's `text_to_sequence(text, ["english_cleaners"])` (no end-of-sequence id).
    Characters and phonemes outside the table are dropped.
    """
    sequence: list[int] = []
    while text:
        m = _curly_re.match(text)
        if m is None:
            sequence += _symbols_to_sequence(clean_text(text, cleaners))
            break
        sequence += _symbols_to_sequence(clean_text(m.group(1), cleaners))
        sequence += _symbols_to_sequence("@" + phoneme for phoneme in m.group(2).split())
        text = m.group(3)
    return sequence


def sequence_to_text(sequence: Iterable[int]) -> str:
    """The cleaned text of a sequence of ids, ARPAbet back in braces ("{HH AH0 L OW1}")."""
    pieces = []
    for symbol_id in sequence:
        symbol = _id_to_symbol.get(int(symbol_id))
        if symbol is None:
            continue
        pieces.append("{" + symbol[1:] + "}" if symbol.startswith("@") else symbol)
    # Adjacent phonemes share one pair of braces.
    return "".join(pieces).replace("}{", " ")
