"""The byte-level text checks and normalizations of the validator give what Arrow's
Unicode string kernels and the regexes they replaced give, on any text: ASCII-only
columns (where the quicker ASCII kernels run) and columns with other characters."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given
from hypothesis import strategies as st

from setlist.etl.raw_events import _normalized, _not_country, _not_id

# ASCII letters and whitespace, the separators 0x1C..0x1F (Unicode whitespace, not ASCII
# whitespace), controls, and characters outside ASCII that case-map or are space
_ALPHABET = "aAzZsSeE \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x00\x7f-_.ßéÉ\u00a0\u2003ǅİ"
_VALUES = st.lists(st.none() | st.text(_ALPHABET, max_size=6), max_size=40)


def _reference(values: pa.Array, upper: bool) -> pa.Array:
    v = (pc.utf8_upper if upper else pc.utf8_lower)(pc.utf8_trim_whitespace(values))
    return pc.if_else(pc.equal(v, ""), pa.scalar(None, pa.string()), v)


@given(_VALUES, st.booleans())
def test_normalized_is_the_unicode_trim_and_case(values, upper):
    array = pa.array(values, pa.string())
    assert _normalized(array, upper=upper).equals(_reference(array, upper))
    ascii_only = pa.array([v if v is None or v.isascii() else "x" for v in values], pa.string())
    assert _normalized(ascii_only, upper=upper).equals(_reference(ascii_only, upper))


@given(_VALUES)
def test_country_and_id_checks_are_their_regexes(values):
    array = _reference(pa.array(values, pa.string()), upper=True)
    country = pc.invert(pc.match_substring_regex(array, "^[A-Z]{2}$"))
    assert _not_country(array).tolist() == pc.fill_null(country, False).to_pylist()
    raw = pa.array(values, pa.string())
    ident = pc.invert(pc.match_substring_regex(raw, "^[\\x21-\\x7e]{1,128}$"))
    assert _not_id(raw).tolist() == pc.fill_null(ident, False).to_pylist()


def test_sliced_and_chunked_columns_are_read_where_they_start():
    values = pa.array([" se ", "Sweden", None, "no", "DK\x1c"], pa.string())
    sliced = values.slice(1)
    assert _not_country(_normalized(sliced, upper=True)).tolist() == [True, False, False, False]
    chunked = pa.chunked_array([values.slice(0, 2), values.slice(2)])
    assert _normalized(chunked, upper=True).to_pylist() == ["SE", "SWEDEN", None, "NO", "DK"]
