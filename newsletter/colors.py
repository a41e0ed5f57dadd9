"""Colour arithmetic for the accent: WCAG contrast, and shades that keep text readable.

The author picks one accent colour; links, buttons and dark mode each need a version of it
with at least 4.5:1 contrast (WCAG AA) against what they sit on.
"""

from __future__ import annotations

from dataclasses import dataclass

AA = 4.5
WHITE = "#ffffff"
BLACK = "#000000"
INK = "#1f1f1f"  # body text on white
DARK_CARD = "#1e1e1e"  # the card's background in dark mode


def _rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(max(0, min(255, c))):02x}" for c in rgb)


def luminance(hex_color: str) -> float:
    def channel(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in _rgb(hex_color))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def mix(a: str, b: str, t: float) -> str:
    """t=0 gives a, t=1 gives b."""
    return _hex(tuple(x + (y - x) * t for x, y in zip(_rgb(a), _rgb(b))))


def readable_on(color: str, background: str, toward: str) -> str:
    """`color`, moved toward `toward` just far enough to reach AA contrast on `background`."""
    for step in range(0, 101):
        shade = mix(color, toward, step / 100)
        if contrast(shade, background) >= AA:
            return shade
    return toward


@dataclass(frozen=True)
class Palette:
    accent: str  # rules, button background
    link: str  # links and kickers on white
    on_accent: str  # text on the button
    dark_link: str  # links and kickers on the dark-mode card


def palette(accent: str) -> Palette:
    # Against any colour, white or black reaches at least 4.58:1.
    on_accent = WHITE if contrast(accent, WHITE) >= contrast(accent, BLACK) else BLACK
    return Palette(
        accent=accent,
        link=readable_on(accent, WHITE, BLACK),
        on_accent=on_accent,
        dark_link=readable_on(accent, DARK_CARD, WHITE),
    )
