"""Markdown for issue bodies: HTML for the email, plain text for its twin, links for checks.

CommonMark with raw HTML off: anything that looks like a tag is shown as text, never
passed through. The parser keeps every link, even javascript:, so that the reader can
report it with its line (see ``links``); ``to_html`` drops the href of any link that
markdown-it's own check rejects, so nothing dangerous is rendered even unchecked.
Each function takes the token list from ``parse`` (a Markdown model caches its own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from markdown_it import MarkdownIt
from markdown_it.token import Token
from markdown_it.tree import SyntaxTreeNode

_md = MarkdownIt("commonmark", {"html": False})
_is_safe_link = _md.validateLink  # markdown-it's: no javascript:, vbscript:, file:, data:
_md.validateLink = lambda url: True

CITATION_MARKS = ("\u2014", "\u2013", "\u2015", "--")  # em dash, en dash, bar, "--"
# Where plain text may break or collapse: str.split()'s white space but the no-break
# spaces (NBSP, figure space, narrow NBSP), which hold words together ("10 000 km").
_BREAKABLE_SPACE = re.compile(r"[^\S\u00a0\u2007\u202f]+")


@dataclass(frozen=True)
class FoundLink:
    kind: str  # "link" or "image"
    url: str
    line: int  # 0-based line within the Markdown text


def parse(text: str) -> list[Token]:
    return _md.parse(text)


def links(tokens: list[Token]) -> list[FoundLink]:
    found = []
    for block in tokens:
        if block.type != "inline" or not block.children:
            continue
        line = block.map[0] if block.map else 0
        for tok in block.children:
            if tok.type in ("softbreak", "hardbreak"):
                line += 1
            elif tok.type == "link_open":
                found.append(FoundLink("link", str(tok.attrs.get("href", "")), line))
            elif tok.type == "image":
                found.append(FoundLink("image", str(tok.attrs.get("src", "")), line))
    return found


def depth(tokens: list[Token]) -> int:
    """How deep blocks and inline elements lie inside each other, at the deepest."""
    deepest = level = 0
    for block in tokens:
        level += block.nesting
        inner = level
        for tok in block.children or ():
            inner += tok.nesting
            deepest = max(deepest, inner)
        deepest = max(deepest, level)
    return deepest


def _mark_citations(tokens: list[Token]) -> None:
    """A block quote whose last paragraph starts with a dash: that paragraph is its citation."""
    open_quotes: list[list] = []  # per open quote: [level of its children, (para_open, inline)]
    for i, tok in enumerate(tokens):
        if tok.type == "blockquote_open":
            open_quotes.append([tok.level + 1, None])
        elif tok.type == "blockquote_close":
            _, last = open_quotes.pop()
            if last and is_citation(last[1].content):
                last[0].attrSet("class", "cite")
        elif open_quotes and tok.nesting == 1 and tok.level == open_quotes[-1][0]:
            open_quotes[-1][1] = (tok, tokens[i + 1]) if tok.type == "paragraph_open" else None


def _drop_unsafe_links(tokens: list[Token]) -> None:
    for block in tokens:
        for tok in block.children or ():
            for attr in ("href", "src"):
                if attr in tok.attrs and not _is_safe_link(str(tok.attrs[attr])):
                    del tok.attrs[attr]


def to_html(tokens: list[Token]) -> str:
    _drop_unsafe_links(tokens)
    _mark_citations(tokens)
    return _md.renderer.render(tokens, _md.options, {})


def is_citation(text: str) -> bool:
    return text.lstrip().startswith(CITATION_MARKS)


# -- plain text ----------------------------------------------------------------------------

def to_text(tokens: list[Token], width: int = 78) -> str:
    """Readable plain text: paragraphs wrapped at `width`, every URL written out whole."""
    root = SyntaxTreeNode(tokens)
    blocks = _blocks(root.children, width)
    return "\n\n".join(blocks).rstrip() + "\n" if blocks else ""


def words(text: str) -> list[str]:
    """`text.split()`, except that a no-break space joins, never splits."""
    return [word for word in _BREAKABLE_SPACE.split(text) if word]


def wrap(text: str, width: int, first: str = "", rest: str | None = None) -> list[str]:
    """Greedy wrapping at white space, like textwrap with break_long_words and
    break_on_hyphens off (a URL or other long word is never cut, a line may run long
    instead), at a fraction of its cost. Never at a no-break space, which is kept."""
    width = max(width, 20)
    rest = first if rest is None else rest
    lines: list[str] = []
    line = first
    room = width - len(first)
    at_start = True
    for word in words(text):
        if at_start:
            line += word
            room -= len(word)
            at_start = False
        elif len(word) < room:
            line += " " + word
            room -= len(word) + 1
        else:
            lines.append(line)
            line = rest + word
            room = width - len(line)
    if at_start:
        return [first.rstrip()]
    lines.append(line)
    return lines


def _blocks(nodes, width: int) -> list[str]:
    out = []
    for node in nodes:
        block = _block(node, width)
        if block is not None:
            out.append(block)
    return out


def _prefixed(text: str, first: str, rest: str) -> str:
    lines = text.split("\n")
    return "\n".join((first if i == 0 else rest) + line if line else (first if i == 0 else rest).rstrip()
                     for i, line in enumerate(lines))


def _block(node: SyntaxTreeNode, width: int) -> str | None:
    kind = node.type
    if kind == "paragraph":
        return "\n".join(_inline_lines(node.children[0], width))
    if kind == "heading":
        title = "\n".join(_inline_lines(node.children[0], width))
        return title.upper() if node.tag in ("h1", "h2") else title
    if kind == "blockquote":
        inner = "\n\n".join(_blocks(node.children, width - 2))
        return _prefixed(inner, "> ", "> ")
    if kind in ("bullet_list", "ordered_list"):
        items = []
        start = int(node.attrs.get("start", 1)) if kind == "ordered_list" else 1
        for n, item in enumerate(node.children):
            marker = f"{start + n}. " if kind == "ordered_list" else "- "
            inner = "\n".join(_blocks(item.children, width - len(marker)))
            items.append(_prefixed(inner, marker, " " * len(marker)))
        return "\n".join(items)
    if kind in ("code_block", "fence"):
        return _prefixed(node.content.rstrip("\n"), "    ", "    ")
    if kind == "hr":
        return "* * *"
    if kind == "html_block":  # unreachable with html off; kept as text if it ever appears
        return node.content.rstrip("\n")
    return "\n\n".join(_blocks(node.children, width)) or None


def _inline_lines(inline: SyntaxTreeNode, width: int) -> list[str]:
    """Inline content as wrapped lines; hard breaks start a new line."""
    pieces: list[str] = [""]
    _inline(inline.children, pieces)
    lines = []
    for piece in pieces:
        lines.extend(wrap(piece, width))
    return lines


def _inline(nodes, pieces: list[str]) -> None:
    for node in nodes:
        kind = node.type
        if kind == "text":
            pieces[-1] += node.content
        elif kind == "softbreak":
            pieces[-1] += " "
        elif kind == "hardbreak":
            pieces.append("")
        elif kind == "code_inline":
            pieces[-1] += f"`{node.content}`"
        elif kind == "em":
            pieces[-1] += "_"
            _inline(node.children, pieces)
            pieces[-1] += "_"
        elif kind == "strong":
            pieces[-1] += "*"
            _inline(node.children, pieces)
            pieces[-1] += "*"
        elif kind == "link":
            href = str(node.attrs.get("href", ""))
            label: list[str] = [""]
            _inline(node.children, label)
            text = " ".join(words(" ".join(label)))
            if node.markup == "autolink" or text == href or text == href.removeprefix("mailto:"):
                pieces[-1] += href.removeprefix("mailto:") if node.markup == "autolink" else href
            else:
                pieces[-1] += f"{text} ({href})"
        elif kind == "image":
            pieces[-1] += str(node.attrs.get("alt", "") or "")
        elif node.children:
            _inline(node.children, pieces)
