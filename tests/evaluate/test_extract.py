"""Answer extraction on real-looking model outputs; option parsing. (Video-MME subtitles:
tests/evaluate/test_readers_videomme_qa.py.)"""

import re

import pytest

from ppllava_jax.evaluate.extract import (
    LETTERS,
    extract_letter,
    normalize_text,
    strip_option_letter,
)

CANDS = ["the man", "the woman", "a dog", "a cat"]


@pytest.mark.parametrize(
    "text, want",
    [
        ("(B) the man", "B"),  # the letter wins over the text
        ("B) the woman", "B"),  # after the "Best option:(" prefix
        ("B.", "B"),
        ("B", "B"),
        ("  C  ", "C"),
        ("b", "B"),
        ("(d)", "D"),
        ("c) a dog", "C"),
        ("The best answer is C", "C"),
        ("The best answer is C.", "C"),
        ("Answer: (D)", "D"),
        ("answer: d", "D"),
        ("Best option: (C) a dog", "C"),
        ("I think the answer is C.", "C"),
        ("Option B is correct", "B"),
        ("the woman", "B"),  # option text without its letter
        ("It is a dog.", "C"),
        ("The woman.", "B"),
        ("the best option is a cat", "D"),  # "a" is the article here
        ("A man is walking", None),  # "A" the article, no option matches
        ("A", "A"),
        ("A. the man", "A"),
        ("(A) the man", "A"),
        ("E", None),  # out of range for four options
        ("I don't know", None),
        ("", None),
    ],
)
def test_extract_letter(text, want):
    assert extract_letter(text, CANDS) == want


def test_extract_without_candidates():
    assert extract_letter("The answer is B", num_options=4) == "B"
    assert extract_letter("(C) something", num_options=4) == "C"
    assert extract_letter("something", num_options=4) is None


def letter_of_answer(answer: str, candidates) -> str:
    """The letter of a reference answer given as a letter ("C"), "(C) text" or option text."""
    a = answer.strip()
    if len(a) == 1 and a.upper() in LETTERS[: len(candidates)]:
        return a.upper()
    m = re.match(r"^\(([A-Za-z])\)", a)
    if m:
        return m.group(1).upper()
    norm = [normalize_text(strip_option_letter(c)) for c in candidates]
    if normalize_text(a) in norm:
        return LETTERS[norm.index(normalize_text(a))]
    raise ValueError(f"answer {answer!r} is none of the candidates {list(candidates)}")


def test_answers_and_options():
    assert letter_of_answer("C", CANDS) == "C"
    assert letter_of_answer("(B) the woman", CANDS) == "B"
    assert letter_of_answer("a cat", CANDS) == "D"
    with pytest.raises(ValueError):
        letter_of_answer("a horse", CANDS)
    assert strip_option_letter("A. Apples.") == "Apples."
    assert strip_option_letter("(B) two") == "two"
