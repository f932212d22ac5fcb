"""Shared Hypothesis strategies for registry property tests."""

from __future__ import annotations

import string

from hypothesis import strategies as st

_PART_HEAD = st.sampled_from(string.ascii_lowercase)
_PART_TAIL = st.text(alphabet=string.ascii_lowercase + string.digits, max_size=6)

#: Names that follow the ``<family>_<layer_type>`` rule.
valid_layer_names = st.builds(
    lambda head, first, rest: "_".join([head + first, *rest]),
    _PART_HEAD,
    _PART_TAIL,
    st.lists(
        st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=6),
        min_size=1,
        max_size=3,
    ),
)

#: Any short string, biased towards characters that matter to the rule.
any_names = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "_- .", max_size=16),
    st.text(max_size=12),
    valid_layer_names,
)
