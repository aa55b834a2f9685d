"""User names: one spelling per user, and none that imitates another.

New names (``trisocks user add``, ``POST /api/users``) go through :func:`normalize_username`:

1. The PRECIS ``UsernameCaseMapped`` profile (RFC 8265 §3.3, package ``precis-i18n``):
   full-width forms are mapped to their narrow forms, letters are lower-cased, the result is
   NFC, and what an identifier must not contain is refused (spaces, controls, zero-width and
   other default-ignorable characters, bidi overrides, compatibility characters, RTL names
   breaking the Bidi Rule). So ``Alice``, ``ALICE`` and a full-width ``alice`` are one user,
   ``alice``.
2. One script (UTS #39 §5.1 "Highly Restrictive"): the scripts of the characters, by their
   Script_Extensions and ignoring Common and Inherited (digits, ``_``, ``-``, ``.``, combining
   marks), must resolve to a single script, or be Latin plus one of Han+Hiragana+Katakana
   (Japanese), Han+Hangul (Korean) or Han+Bopomofo. ``paypal`` with a Cyrillic ``a`` is
   refused; an all-Cyrillic or all-Greek name is fine. (Whole-script confusables, a name all
   in Cyrillic letters that look Latin, are not detected.)
3. Not reserved: names in parentheses are the server's own rows (``(anonymous)``,
   ``(other)`` in metrics), so no name may start with ``(``; and 1..255 UTF-8 bytes (RFC 1929).

Logins (:func:`login_form`, :func:`resolve_username`) look a name up as sent, then in its
normalized form: names stored by an older trisocks that the store's migration could not
rename (a collision, or a name PRECIS refuses) keep working when typed exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import precis_i18n
import regex

__all__ = ["login_form", "normalize_username", "resolve_username", "scripts_of"]

_PROFILE = precis_i18n.get_profile("UsernameCaseMapped")

# Unicode scripts (long names, as the ``regex`` module knows them); Common and Inherited are
# left out on purpose. A name the installed ``regex`` does not know is skipped.
_SCRIPT_NAMES = """
Adlam Ahom Anatolian_Hieroglyphs Arabic Armenian Avestan Balinese Bamum Bassa_Vah Batak Bengali
Beria_Erfe Bhaiksuki Bopomofo Brahmi Braille Buginese Buhid Canadian_Aboriginal Carian
Caucasian_Albanian Chakma Cham Cherokee Chorasmian Coptic Cuneiform Cypriot Cypro_Minoan
Cyrillic Deseret Devanagari Dives_Akuru Dogra Duployan Egyptian_Hieroglyphs Elbasan Elymaic
Ethiopic Garay Georgian Glagolitic Gothic Grantha Greek Gujarati Gunjala_Gondi Gurmukhi
Gurung_Khema Hangul Han Hanifi_Rohingya Hanunoo Hatran Hebrew Hiragana Imperial_Aramaic
Inscriptional_Pahlavi Inscriptional_Parthian Javanese Jurchen Kaithi Kannada Katakana Kawi
Kayah_Li Kharoshthi Khitan_Small_Script Khmer Khojki Khudawadi Kirat_Rai Lao Latin Lepcha Limbu
Linear_A Linear_B Lisu Lycian Lydian Mahajani Makasar Malayalam Mandaic Manichaean Marchen
Masaram_Gondi Medefaidrin Meetei_Mayek Mende_Kikakui Meroitic_Cursive Meroitic_Hieroglyphs Miao
Modi Mongolian Mro Multani Myanmar Nabataean Nag_Mundari Nandinagari Newa New_Tai_Lue Nko Nushu
Nyiakeng_Puachue_Hmong Ogham Ol_Chiki Old_Hungarian Old_Italic Old_North_Arabian Old_Permic
Old_Persian Old_Sogdian Old_South_Arabian Old_Turkic Old_Uyghur Ol_Onal Oriya Osage Osmanya
Pahawh_Hmong Palmyrene Pau_Cin_Hau Phags_Pa Phoenician Proto_Cuneiform Psalter_Pahlavi Rejang
Runic Samaritan Saurashtra Seal Sharada Shavian Siddham Sidetic SignWriting Sinhala Sogdian
Sora_Sompeng Soyombo Sundanese Sunuwar Syloti_Nagri Syriac Tagalog Tagbanwa Tai_Le Tai_Tham
Tai_Viet Tai_Yo Takri Tamil Tangsa Tangut Telugu Thaana Thai Tibetan Tifinagh Tirhuta Todhri
Tolong_Siki Toto Tulu_Tigalari Ugaritic Vai Vithkuqi Wancho Warang_Citi Yezidi Yi
Zanabazar_Square
""".split()


def _compile(name: str) -> regex.Pattern[str] | None:
    try:
        return regex.compile(rf"\p{{Script_Extensions={name}}}")
    except regex.error:
        return None


_SCRIPTS = {name: p for name in _SCRIPT_NAMES if (p := _compile(name)) is not None}
_COMMON = regex.compile(r"[\p{Script_Extensions=Common}\p{Script_Extensions=Inherited}]")

# UTS #39 §5.1 augmentation: the writing systems a script belongs to.
_JAPANESE, _KOREAN, _HANB = "Japanese", "Korean", "Han with Bopomofo"
_AUGMENT = {
    "Han": {_JAPANESE, _KOREAN, _HANB},
    "Hiragana": {_JAPANESE},
    "Katakana": {_JAPANESE},
    "Hangul": {_KOREAN},
    "Bopomofo": {_HANB},
}


@functools.lru_cache(maxsize=4096)
def _char_scripts(char: str) -> frozenset[str]:
    """The augmented Script_Extensions of *char*; empty for Common and Inherited ones."""
    if char.isascii():
        return frozenset({"Latin"}) if char.isalpha() else frozenset()
    if _COMMON.match(char):
        return frozenset()
    found: set[str] = set()
    for name, pattern in _SCRIPTS.items():
        if pattern.match(char):
            found |= {name, *_AUGMENT.get(name, ())}
    return frozenset(found or {"Unknown"})


def scripts_of(name: str) -> set[str]:
    """The scripts *name*'s characters are written in (Common and Inherited left out)."""
    scripts: set[str] = set()
    for char in name:
        chars = _char_scripts(char)
        if chars:  # a character in several scripts (scx) names its first, for messages
            scripts.add(min(chars - {_JAPANESE, _KOREAN, _HANB}, default=min(chars)))
    return scripts


def _resolved(sets: list[frozenset[str]]) -> set[str]:
    """UTS #39 resolved script set: what every character's scripts have in common."""
    result: set[str] | None = None
    for s in sets:
        result = set(s) if result is None else result & s
    return result if result is not None else {"Common"}


def _single_script(name: str) -> bool:
    """UTS #39 "Highly Restrictive" (module docstring, point 2)."""
    sets = [s for s in map(_char_scripts, name) if s]
    if _resolved(sets):
        return True
    non_latin = [s for s in sets if "Latin" not in s]
    return bool(_resolved(non_latin) & {_JAPANESE, _KOREAN, _HANB})


def normalize_username(name: str) -> str:
    """The form *name* is stored and compared in (module docstring).

    Raises:
        ValueError: with a message naming what is wrong with *name*.
    """
    if not name:
        raise ValueError("user name must not be empty")
    if name.startswith("("):
        raise ValueError("user names starting with '(' are reserved, like (anonymous)")
    try:
        normal = _PROFILE.enforce(name)
    except UnicodeEncodeError as exc:
        char = exc.object[exc.start] if isinstance(exc.object, str) else "?"
        why = exc.reason.partition("/")[2] or exc.reason
        raise ValueError(
            f"user name {name!r} is not allowed: character U+{ord(char):04X} at position "
            f"{exc.start} ({why.replace('_', ' ')}); see RFC 8265 (PRECIS usernames)"
        ) from None
    if normal.startswith("("):  # e.g. a full-width parenthesis mapped to "("
        raise ValueError("user names starting with '(' are reserved, like (anonymous)")
    if not _single_script(normal):
        scripts = ", ".join(sorted(scripts_of(normal)))
        raise ValueError(f"user name {name!r} mixes scripts ({scripts}); use one script")
    size = len(normal.encode())
    if size > 255:
        raise ValueError(f"user name is {size} bytes; RFC 1929 allows at most 255")
    return normal


def login_form(name: str) -> str | None:
    """*name* normalized for a lookup (after the name as sent found no user), or ``None``
    when PRECIS refuses it or it is already normal. The script rule is not applied: it only
    keeps new names apart."""
    try:
        normal = _PROFILE.enforce(name)
    except UnicodeEncodeError:
        return None
    return normal if normal != name else None


def resolve_username(name: str, exists: Callable[[str], bool]) -> str:
    """The stored name *name* refers to: itself if *exists*, else its normalized form if
    that exists, else *name* (for "no user" messages). For ``trisocks user passwd|remove|
    limits`` and logins alike (module docstring)."""
    if exists(name):
        return name
    normal = login_form(name)
    return normal if normal is not None and exists(normal) else name
