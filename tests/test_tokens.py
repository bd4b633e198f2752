"""Token format: prefix + 32 base62 + 6-character CRC32 checksum; ids are sortable ULIDs."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from authgate import tokens

PREFIXES = st.sampled_from(["min_", "ak_live_", "ak_test_", "x_"])


@given(PREFIXES)
def test_generated_tokens_are_well_formed(prefix: str) -> None:
    """Every generated token parses under its own prefix and not under another."""
    token = tokens.generate(prefix)
    assert tokens.is_well_formed(token, prefix)
    assert len(token) == len(prefix) + 38
    assert not tokens.is_well_formed(token, "zz_")
    assert tokens.display_prefix(token, prefix) == token[: len(prefix) + 4]


@settings(max_examples=300)
@given(PREFIXES, st.data())
def test_any_one_character_change_fails(prefix: str, data: st.DataObject) -> None:
    """Changing any single character of a token, anywhere, makes it malformed."""
    token = tokens.generate(prefix)
    pos = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.characters(codec="ascii").filter(lambda c: c != token[pos]))
    mutated = token[:pos] + replacement + token[pos + 1 :]
    assert not tokens.is_well_formed(mutated, prefix)


@given(st.text(max_size=80))
def test_arbitrary_text_is_rejected_without_error(text: str) -> None:
    """Random text is (almost surely) malformed and never raises."""
    assert tokens.is_well_formed(text, "min_") in (True, False)
    if not text.startswith("min_"):
        assert not tokens.is_well_formed(text, "min_")


def test_truncated_and_extended_tokens_fail() -> None:
    """Dropping or adding a character is caught by the length check."""
    token = tokens.generate("min_")
    assert not tokens.is_well_formed(token[:-1], "min_")
    assert not tokens.is_well_formed(token + "a", "min_")


def test_hash_depends_on_pepper_and_token() -> None:
    """The stored hash is an HMAC: other pepper or token, other hash; never the token."""
    token = tokens.generate("min_")
    a = tokens.hash_token(b"p" * 32, token)
    assert a != tokens.hash_token(b"q" * 32, token)
    assert a != tokens.hash_token(b"p" * 32, tokens.generate("min_"))
    assert token not in a and len(a) == 64


def test_ids_are_sortable_by_creation_time() -> None:
    """Ids created later sort later (ULID time prefix)."""
    first = tokens.new_id(time.time())
    later = tokens.new_id(time.time() + 1)
    assert first < later
    assert tokens.looks_like_id(first)
    assert not tokens.looks_like_id("tok_123")
