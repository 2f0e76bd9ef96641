"""Whatever a tables.toml holds, the loader answers with a Config or a ConfigError: never
another exception, never a hang (hypothesis-generated documents, fixed seed)."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from shmreplay.config import ConfigError, load_config, parse_config

KEYS = [
    "name",
    "max_size",
    "kind",
    "sampler",
    "remover",
    "rate_limiter",
    "max_times_sampled",
    "headroom",
    "signature",
    "shape",
    "dtype",
    "priority_exponent",
    "min_size",
    "size",
    "samples_per_insert",
    "min_size_to_sample",
    "error_buffer",
    "min_diff",
    "max_diff",
    "checkpoint_dir",
    "checkpoint_interval_s",
    "checkpoint_keep",
    "group",
    "metrics_port",
    "max_clients",
    "obs",
    "x",
]
WORDS = [
    "uniform",
    "prioritized",
    "fifo",
    "lifo",
    "min_heap",
    "max_heap",
    "queue",
    "stack",
    "min_size",
    "sample_to_insert_ratio",
    "custom",
    "float32",
    "uint8",
    "bool",
    "int64",
    "replay",
    "a/b",
    "",
    "default",
]

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(WORDS),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=6),
    ),
    max_leaves=20,
)
tables = st.lists(st.dictionaries(st.sampled_from(KEYS), values, max_size=8), max_size=3)
documents = st.fixed_dictionaries(
    {},
    optional={
        "server": st.dictionaries(st.sampled_from(KEYS), values, max_size=4),
        "table": tables,
        "extra": values,
    },
)


@seed(20261125)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_document_gives_a_config_or_a_config_error(doc):
    try:
        config = parse_config(doc, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml")
        return
    for t in config.tables:  # what is accepted is sane
        assert t.max_size >= 1 and t.signature and t.num_slots > t.max_size
        lim = t.rate_limiter
        assert lim.samples_per_insert > 0 and math.isfinite(lim.samples_per_insert)
        assert lim.min_diff <= lim.max_diff


@seed(20261125)
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "tables.toml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError:
        pass
