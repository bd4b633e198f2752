"""The usage chart on a token's page: an SVG drawn on the server, one bar a day.

Each bar stacks the allowed requests (bottom) and the denials by code above them; no
script and no inline style, so the page's Content-Security-Policy holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

WIDTH, HEIGHT, PAD = 720, 180, 28
# Fill classes for the stylesheet, in stacking order; any other denial code is "other".
SERIES = (
    ("allowed", "allowed"),
    ("TOKEN_EXPIRED", "expired"),
    ("TOKEN_DISABLED", "disabled"),
    ("IP_NOT_ALLOWED", "ip"),
    ("SCOPE_MISMATCH", "scope"),
    ("INSUFFICIENT_KEY_TYPE", "keytype"),
    ("ADMIN_REQUIRED", "admin"),
    ("INSUFFICIENT_PERMISSIONS", "permissions"),
)
_KNOWN = {code for code, _ in SERIES}


def _stack(day: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    denied: Mapping[str, int] = day.get("denied") or {}
    parts = [("allowed", "allowed", int(day.get("allowed") or 0))]
    for code, css in SERIES[1:]:
        parts.append((code, css, int(denied.get(code) or 0)))
    other = sum(int(n) for code, n in denied.items() if code not in _KNOWN)
    parts.append(("other", "other", other))
    return [p for p in parts if p[2] > 0]


def usage_svg(days: Sequence[Mapping[str, Any]]) -> str:
    """`days`: oldest first, each {"date": "YYYY-MM-DD", "allowed": n, "denied": {code: n}}."""
    totals = [sum(n for _, _, n in _stack(d)) for d in days]
    top = max([*totals, 1])
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    slot = inner_w / max(len(days), 1)
    bar = max(slot * 0.7, 1.0)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'class="chart" role="img" aria-label="Requests per day, allowed and denied">',
        f'<text x="{PAD}" y="{PAD - 10}" class="axis">{top} requests</text>',
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
        'class="baseline"/>',
    ]
    for i, day in enumerate(days):
        x = PAD + i * slot + (slot - bar) / 2
        y = float(HEIGHT - PAD)
        for code, css, n in _stack(day):
            h = inner_h * n / top
            y -= h
            label = escape(f"{day.get('date', '')}: {code} {n}")
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'class="bar {css}"><title>{label}</title></rect>'
            )
        last = len(days) - 1
        if i % 7 == 0 or (i == last and last % 7 >= 3):
            date = escape(str(day.get("date", ""))[5:])
            out.append(
                f'<text x="{x + bar / 2:.1f}" y="{HEIGHT - PAD + 14}" class="tick">{date}</text>'
            )
    out.append("</svg>")
    return "".join(out)


LEGEND = (*((css, code) for code, css in SERIES), ("other", "other denials"))
