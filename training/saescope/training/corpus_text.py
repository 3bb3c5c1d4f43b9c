"""Shipped text formats turned into paragraphs, for the default corpus (``corpus.py``).

Each converter takes a file's bytes as an archive ships them (gzip is undone here) and returns its
paragraphs: fortune databases, plain text, XHTML (DocBook output), Mallard XML (GNOME help) and
man pages (roff with the man(7) macros). ``in_language`` spots the paragraphs of a translation
that are still in English, since translated manuals fall back to the original where untranslated.
``pack`` joins paragraphs into documents of a bounded size.
"""

from __future__ import annotations

import gzip
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser

_OVERSTRIKE = re.compile(r".\x08")  # old fortunes underline with "_\b"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def decode(data: bytes) -> str:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # the older fortune files and man pages
    text = text.replace("\r\n", "\n")
    return _CONTROL.sub("", _OVERSTRIKE.sub("", text))


def paragraphs(data: bytes) -> list[str]:
    """Blank-line separated paragraphs; leading indentation kept (code, verse)."""
    return [p.rstrip() for p in _PARAGRAPH_BREAK.split(decode(data)) if p.strip()]


def fortunes(data: bytes) -> list[str]:
    """A fortune database: entries separated by lines holding only ``%``."""
    entries = re.split(r"^%\s*$", decode(data), flags=re.MULTILINE)
    return [e.strip("\n").rstrip() for e in entries if e.strip()]


def jargon(data: bytes) -> list[str]:
    """The Jargon File; its table of contents (short lines that are no headword) is dropped."""
    return [p for p in paragraphs(data) if "\n" in p or p.lstrip().startswith(":") or len(p) > 60]


class _HtmlText(HTMLParser):
    """Paragraphs of an XHTML page (DocBook output), without navigation or tables of contents."""

    BLOCKS = frozenset({
        "p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
        "pre", "tr", "table", "title", "blockquote", "ul", "ol", "dl", "br",
    })  # fmt: skip
    SKIP_TAGS = frozenset({"head", "script", "style"})
    SKIP_CLASSES = frozenset({"navheader", "navfooter", "docnav", "toc", "breadcrumbs"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.units: list[str] = []
        self._buf: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, starts a skipped subtree)
        self._skipping = 0
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set((dict(attrs).get("class") or "").split())
        skip = tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES)
        if tag in self.BLOCKS:
            self._flush()
        if tag in ("td", "th"):
            self._buf.append(" ")
        if tag in ("br", "img", "hr", "meta", "link", "input"):
            return  # void elements never close in HTML
        self._stack.append((tag, skip))
        self._skipping += skip
        self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if all(t != tag for t, _ in self._stack):
            return
        while self._stack:
            open_tag, skip = self._stack.pop()
            self._skipping -= skip
            self._pre -= open_tag == "pre"
            if open_tag == tag:
                break
        if tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._buf.append(data if self._pre else re.sub(r"\s+", " ", data))

    def _flush(self) -> None:
        text = "".join(self._buf)
        self._buf = []
        text = text.strip("\n").rstrip() if self._pre else text.strip()
        if text.strip():
            self.units.append(text)


def html(data: bytes) -> list[str]:
    parser = _HtmlText()
    parser.feed(decode(data))
    parser.close()
    parser._flush()
    return parser.units


_MALLARD_SKIP = frozenset({"info", "links", "comment", "media"})
_MALLARD_TEXT = frozenset({"title", "subtitle", "p"})
_MALLARD_VERBATIM = frozenset({"code", "screen"})


def mallard(data: bytes) -> list[str]:
    """A GNOME help page (Mallard XML): titles, paragraphs and code blocks."""
    units: list[str] = []

    def walk(element: ET.Element) -> None:
        name = element.tag.rsplit("}", 1)[-1]
        if name in _MALLARD_SKIP:
            return
        if name in _MALLARD_TEXT or name in _MALLARD_VERBATIM:
            text = "".join(element.itertext())
            text = (
                text.strip("\n").rstrip() if name in _MALLARD_VERBATIM else " ".join(text.split())
            )
            if text.strip():
                units.append(text)
            return
        for child in element:
            walk(child)

    walk(ET.fromstring(data))
    return units


# One left-to-right scan, so an escaped backslash (``\\`` / ``\e``) never starts another escape.
_ROFF_ESCAPE = re.compile(
    r"""\\(?:
      "(?P<comment>.*)                              # comment to the end of the line
    | \((?P<short>..) | \[(?P<long>[^\]]*)\]        # special characters: \(em, \[u00E9]
    | [fFmMn*gkYV](?:\[[^\]]*\]|\(..|.)             # fonts, colours, registers, strings
    | s[+-]?(?:\(\d\d|\[\d+\]|\d)                   # size changes
    | [hvwNlLbxoDRXZ]'[^']*'                        # motions and drawing
    | (?P<char>.)
    )""",
    re.VERBOSE,
)
_ROFF_SPECIALS = {
    "em": "—", "en": "–", "hy": "-", "aq": "'", "cq": "’", "oq": "‘", "dq": '"', "lq": "“",
    "rq": "”", "Fo": "«", "Fc": "»", "bu": "•", "co": "©", "rg": "®", "tm": "™", "mu": "×",
    "+-": "±", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "rs": "\\", "sl": "/",
    "ha": "^", "ti": "~", "ga": "`", "dg": "†", "de": "°", "sc": "§", "ps": "¶", "Eu": "€",
}  # fmt: skip
_ROFF_CHARS = {"e": "\\", "\\": "\\", "-": "-", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`"}


def _roff_escape(match: re.Match[str]) -> str:
    name = match["short"] or match["long"]
    if name is not None:
        if re.fullmatch(r"u[0-9A-F]{4,6}", name):
            return chr(int(name[1:], 16))
        return _ROFF_SPECIALS.get(name, "")
    char = match["char"]
    if char is None:  # a comment, or an escape that prints nothing
        return ""
    return _ROFF_CHARS.get(char, char if char in ".!?[]<>" else "")


_ROFF_BREAKS = frozenset({
    "PP", "LP", "P", "TP", "TQ", "IP", "HP", "SH", "SS", "RS", "RE",
    "sp", "br", "nf", "fi", "EX", "EE", "TH", "in", "ti", "ne", "bp",
})  # fmt: skip
_ROFF_FONT_MACROS = frozenset({"B", "I", "R", "SM", "SB", "BR", "BI", "IB", "RB", "RI", "IR"})


def _roff_inline(text: str) -> str:
    return _ROFF_ESCAPE.sub(_roff_escape, text)


def _roff_args(rest: str) -> list[str]:
    return [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', rest)]


def roff(data: bytes) -> list[str]:
    """A man page (man(7) macros) as plain paragraphs: requests dropped, escapes resolved."""
    units: list[str] = []
    lines: list[str] = []
    fill, skip_until = True, ""

    def flush() -> None:
        text = ("\n" if not fill else " ").join(lines).strip()
        lines.clear()
        if text:
            units.append(text)

    for line in decode(data).split("\n"):
        if skip_until:  # inside .de/.ig blocks or a table's format lines
            if line.rstrip().endswith(skip_until) or line.startswith(skip_until):
                skip_until = ""
            continue
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if not line.startswith((".", "'")):
            text = _roff_inline(line.replace("\t", "  ").replace("T{", "").replace("T}", ""))
            if text.strip() or not fill:
                lines.append(text)
            continue
        macro, _, rest = line[1:].strip().partition(" ")
        if macro in ("de", "ig", "am"):
            skip_until = ".."
        elif macro == "TS":
            flush()
            skip_until = "."  # the format lines end with a period
        elif macro in _ROFF_BREAKS or macro in ("TE", "UR", "UE", "MT", "ME"):
            flush()
            fill = {"nf": False, "EX": False, "fi": True, "EE": True}.get(macro, fill)
            if macro in ("SH", "SS") and rest:
                units.append(_roff_inline(" ".join(_roff_args(rest))))
            elif macro == "IP" and rest:
                lines.append(_roff_inline(_roff_args(rest)[0]))
        elif macro in _ROFF_FONT_MACROS:
            joiner = " " if len(macro) == 1 or macro in ("SM", "SB") else ""
            lines.append(_roff_inline(joiner.join(_roff_args(rest))))
    flush()
    return units


_STOPWORDS = {
    "en": "the and of to is that with for this are it which be by not you can from have will",
    "fr": "le la les des et est une pour dans que qui du sur pas un au avec ce il vous",
    "de": "der die das und ist nicht mit ein eine den von zu auf für sich des dem im werden",
    "es": "el la los las de que y en es por una para con del se un no al su lo",
    "it": "il la di che e è per un una del della non con sono si le gli da nel",
}
_STOPWORD_SETS = {lang: frozenset(words.split()) for lang, words in _STOPWORDS.items()}


def in_language(paragraph: str, lang: str) -> bool:
    """False for a paragraph of a translation that is still English (untranslated strings)."""
    if lang == "en" or lang not in _STOPWORD_SETS:
        return True
    words = re.findall(r"[^\W\d_]+", paragraph.lower())
    english = sum(w in _STOPWORD_SETS["en"] for w in words)
    native = sum(w in _STOPWORD_SETS[lang] for w in words)
    return english < 2 or native >= english


def _split_long(paragraph: str, max_chars: int) -> Iterator[str]:
    """A paragraph above ``max_chars``, cut at line breaks, else at spaces, else hard."""
    while len(paragraph) > max_chars:
        window = paragraph[:max_chars]
        cut = max(window.rfind("\n"), window.rfind(" "))
        cut = cut if cut > max_chars // 2 else max_chars
        yield paragraph[:cut].rstrip()
        paragraph = paragraph[cut:].lstrip("\n ")
    if paragraph.strip():
        yield paragraph


def pack(paragraphs: Iterable[str], max_chars: int, min_chars: int) -> list[str]:
    """Paragraphs greedily joined (blank line between) into documents of at most ``max_chars``;
    pieces under ``min_chars`` (a man page that only redirects) are dropped."""
    docs: list[str] = []
    current = ""
    for paragraph in paragraphs:
        for piece in _split_long(paragraph, max_chars):
            if current and len(current) + 2 + len(piece) > max_chars:
                docs.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        docs.append(current)
    return [d for d in docs if len(d.strip()) >= min_chars]
