"""Independent judges of steered text: does a continuation show the concept?

Never the SAE and never the served model (DESIGN: interpretability claims are measured): a
language identifier (py3langid, langid.py's model over 97 languages) for languages, a
sentiment lexicon (VADER, Hutto & Gilbert 2014) for sentiment, Python's own parser for code,
and keyword lexicons for topics. Each judge returns a score in [0, 1]; a continuation *shows*
the concept when its score is at least 0.5. ``judge_accuracy`` measures each judge on the
concept's held-out sentences (both sides), which the report prints beside every result.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Callable
from functools import cache
from typing import Any

from saescope.service.steer_eval.concepts import TOPIC_WORDS, Concept

Judge = Callable[[str], float]
WORD = re.compile(r"[a-zà-ÿ]+")
MISSING = "the steering evaluation's judges need: pip install 'saescope[eval]'"


@cache
def _langid() -> Any:
    try:
        import py3langid
    except ModuleNotFoundError:
        raise ModuleNotFoundError(MISSING) from None
    return py3langid  # its default identifier: the shipped model, every language it knows


@cache
def _vader() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ModuleNotFoundError:
        raise ModuleNotFoundError(MISSING) from None
    return SentimentIntensityAnalyzer()


def language(target: str) -> Judge:
    """1 when the identifier names ``target`` (ISO 639-1) among all 97 languages it knows."""

    def judge(text: str) -> float:
        if not WORD.search(text.lower()):
            return 0.0  # no words at all (punctuation runs, digits): no language
        lang, _ = _langid().classify(text)
        return float(lang == target)

    return judge


def sentiment(target: str) -> Judge:
    """VADER's compound score mapped to [0, 1] towards ``target`` ("positive" or "negative")."""
    sign = 1.0 if target == "positive" else -1.0

    def judge(text: str) -> float:
        compound = float(_vader().polarity_scores(text)["compound"])  # [-1, 1]
        return (1.0 + sign * compound) / 2.0

    return judge


def python_code(_target: str) -> Judge:
    """1 when the text parses as Python with a statement or call in it, or when its tokens are
    mostly code (a continuation cut mid-statement): at least 8 tokens, a third of them
    operators, brackets or keywords; 0 for prose."""

    def judge(text: str) -> float:
        stripped = text.strip()
        if not stripped:
            return 0.0
        try:
            if any(isinstance(n, _CODE_NODES) for n in ast.walk(ast.parse(stripped))):
                return 1.0
        except (SyntaxError, ValueError):
            pass
        return float(_code_like(stripped))

    return judge


_CODE_NODES = (
    ast.FunctionDef,
    ast.ClassDef,
    ast.Import,
    ast.ImportFrom,
    ast.Assign,
    ast.AugAssign,
    ast.For,
    ast.While,
    ast.If,
    ast.Return,
    ast.Call,
    ast.comprehension,
)  # what a bare word or two ("hello world" parses as a name) never holds
_KEYWORDS = frozenset(
    [
        "def",
        "return",
        "import",
        "from",
        "class",
        "for",
        "in",
        "while",
        "if",
        "elif",
        "else",
        "lambda",
        "print",
        "self",
        "None",
        "True",
        "False",
        "try",
        "except",
        "with",
        "as",
        "yield",
    ]
)


def _code_like(text: str) -> bool:
    kinds: list[int] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                continue
            if tok.type == tokenize.ENDMARKER:
                break
            kinds.append(-1 if tok.string in _KEYWORDS else tok.type)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # cut mid-statement: judge what was read
    if len(kinds) < 8:
        return False
    codeish = sum(k in (tokenize.OP, -1) for k in kinds)
    return codeish / len(kinds) >= 1 / 3


def topic(target: str) -> Judge:
    """1 when the text holds a word of the topic's lexicon (``concepts.TOPIC_WORDS``)."""
    words = TOPIC_WORDS[target]

    def judge(text: str) -> float:
        return float(any(w in words for w in WORD.findall(text.lower())))

    return judge


JUDGES: dict[str, Callable[[str], Judge]] = {
    "language": language,
    "sentiment": sentiment,
    "code": python_code,
    "topic": topic,
}
"""Judge kind (``Concept.judge``) → a judge for the concept's ``target``."""


def judge_for(concept: Concept) -> Judge:
    return JUDGES[concept.judge](concept.target)


def shows(judge: Judge, text: str) -> bool:
    """Whether ``text`` shows the concept (score ≥ 0.5)."""
    return judge(text) >= 0.5


def judge_accuracy(concept: Concept) -> float:
    """Fraction of the concept's held-out sentences the judge gets right (both sides)."""
    judge = judge_for(concept)
    right = [shows(judge, s) for s in concept.heldout_positive]
    right += [not shows(judge, s) for s in concept.heldout_negative]
    return sum(right) / len(right)
