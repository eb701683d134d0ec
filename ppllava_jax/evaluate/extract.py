"""Answer extraction from free-form model outputs (multiple choice).

``extract_letter(text, candidates)`` returns the option letter a model answered, or None.
It reads, in this order of trust:

1. an explicit statement: "The best answer is C", "Answer: (D)", "best option: b", "option B";
2. a letter at the very start: "(B) the man", "B) the man" (after the MVBench prefix
   ``Best option:(``), "B.", "B", "b)", "B: walking"; a bare "A"/"I" followed by words is
   read as the English word unless the words match that option's text;
3. an option's text without its letter ("the man is walking" -> the candidate it matches;
   the longest candidate contained in the output wins, case and punctuation ignored);
4. the first letter written as "(C)" anywhere, then the first standalone capital letter of
   the valid range (A-D for four options) other than "A"/"I".
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

LETTERS = string.ascii_uppercase

_EXPLICIT = re.compile(
    r"(?:answer|option|choice)(?:\s+is)?\s*(?:[:\-]|is)?\s*[\(\[]?\s*([A-Za-z])\s*(?:[\)\].:,;]|$|\s)",
    re.IGNORECASE,
)
_START = re.compile(r"^[\s\"'*]*[\(\[]?\s*([A-Za-z])\s*([\)\].:,;]|$|\s)")
_PAREN = re.compile(r"\(\s*([A-Za-z])\s*\)")
_CAPITAL = re.compile(r"\b([A-Z])\b")


def normalize_text(s: str) -> str:
    """Lower case, a leading option letter (``(b) ``, ``b) ``) dropped, punctuation as spaces,
    whitespace collapsed: what option texts are compared by."""
    s = s.lower()
    s = re.sub(r"^\s*\(?[a-z]\)\s*", "", s)  # a leading "(b) " or "b) "
    s = "".join(c if c.isalnum() else " " for c in s)
    return " ".join(s.split())


def strip_option_letter(option: str) -> str:
    """ "A. the man" / "(A) the man" / "A) the man" -> "the man" (Video-MME style options)."""
    m = re.match(r"^\s*\(?([A-Za-z])\s*[\).:]\s*(.*)$", option, re.S)
    return m.group(2).strip() if m else option.strip()


def match_candidate(text: str, candidates: Sequence[str]) -> int | None:
    """Index of the candidate whose (normalised) text the output equals or contains; the
    longest contained candidate wins; None if none or if two equally long ones match."""
    t = normalize_text(text)
    if not t:
        return None
    cands = [normalize_text(strip_option_letter(c)) for c in candidates]
    for i, c in enumerate(cands):
        if c and t == c:
            return i
    hits = [(len(c), i) for i, c in enumerate(cands) if c and re.search(rf"\b{re.escape(c)}\b", t)]
    if not hits:
        # the output is a prefix of exactly one candidate ("the man" vs "the man walks")
        pre = [i for i, c in enumerate(cands) if c and c.startswith(t) and len(t) >= 3]
        return pre[0] if len(pre) == 1 else None
    hits.sort(reverse=True)
    if len(hits) > 1 and hits[0][0] == hits[1][0]:
        return None
    return hits[0][1]


def extract_letter(
    text: str, candidates: Sequence[str] | None = None, num_options: int | None = None
) -> str | None:
    """The option letter of ``text`` (upper case) or None. See the module docstring.

    candidates: the options' texts (with or without their letters); enables rule 3 and
      bounds the valid letters. num_options: bound the letters without candidates (default 26,
      or len(candidates)).
    """
    if text is None:
        return None
    n = len(candidates) if candidates else (num_options or 26)
    valid = LETTERS[:n]
    s = text.strip()
    if not s:
        return None

    def ok(ch: str) -> bool:
        return ch.upper() in valid

    m = _EXPLICIT.search(s)
    if m and ok(m.group(1)):
        # "the best option is a man ..." is not a letter: lower-case needs punctuation or end
        ch, tail = m.group(1), s[m.end(1) :].lstrip()
        if ch.isupper() or not tail or tail[0] in ").]:;,.":
            if not (ch in "AI" and tail[:1].isalpha() and tail[:1].islower()):
                return ch.upper()
    m = _START.match(s)
    if m and ok(m.group(1)):
        ch, sep = m.group(1), m.group(2)
        rest = s[m.end() :].strip()
        if sep.strip() or not rest:  # "B)", "B.", "B:", "(b)", "B"
            if ch.isupper() or sep.strip() or len(s.strip("()[]. ")) == 1:
                return ch.upper()
        elif ch.isupper() and ch not in "AI":  # "B the man"
            return ch
        elif ch.isupper() and candidates:  # "A man walks": a letter only if its option says so
            idx = match_candidate(rest, candidates)
            if idx == LETTERS.index(ch):
                return ch
    if candidates:
        idx = match_candidate(s, candidates)
        if idx is not None:
            return LETTERS[idx]
    for m in _PAREN.finditer(s):
        if ok(m.group(1)):
            return m.group(1).upper()
    for m in _CAPITAL.finditer(s):
        if ok(m.group(1)) and m.group(1) not in "AI":
            return m.group(1)
    return None
