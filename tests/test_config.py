"""tables.toml → frozen, validated specs: defaults, presets, round trips and every refusal."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import msgpack
import pytest

import shmreplay
from shmreplay import ConfigError, RateLimiterSpec, SelectorSpec, TableSpec
from shmreplay.config import FieldSpec, ServerSpec, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tables.toml"


def table(**kw) -> dict:
    """A minimal valid [[table]] as parsed TOML, with keys overridden or added by ``kw``."""
    d = {
        "name": "replay",
        "max_size": 100,
        "signature": {"obs": {"shape": [8], "dtype": "float32"}},
    }
    d.update(kw)
    return d


def parse_one(**kw) -> TableSpec:
    cfg = parse_config({"table": [table(**kw)]}, "test.toml")
    assert len(cfg.tables) == 1
    return cfg.tables[0]


# -- the example file and defaults -----------------------------------------------------------------


def test_example_file_loads():
    """examples/tables.toml is valid and means what its comments say."""
    cfg = shmreplay.load_config(EXAMPLE)
    assert isinstance(cfg, shmreplay.Config)
    assert cfg.server.name == "default"
    assert [t.name for t in cfg.tables] == ["replay", "recent"]
    replay = cfg.table("replay")
    assert replay.sampler == SelectorSpec("prioritized", 0.6)
    assert replay.remover == SelectorSpec.fifo()
    assert replay.rate_limiter == RateLimiterSpec.min_size(1000)
    assert replay.rate_limiter.min_size_to_sample == 1000
    assert replay.max_size == 1_000_000 and replay.max_times_sampled == 0
    assert [(f.name, f.shape, f.dtype) for f in replay.signature] == [
        ("obs", (8,), "float32"),
        ("action", (), "int64"),
        ("reward", (), "float32"),
        ("done", (), "bool"),
    ]
    assert replay.row_bytes == 8 * 4 + 8 + 4 + 1
    recent = cfg.table("recent")
    assert recent.sampler == SelectorSpec.uniform() and recent.max_size == 10_000
    with pytest.raises(KeyError):
        cfg.table("nope")


def test_defaults():
    """A table giving only name, max_size and signature gets uniform/fifo/min_size(1)."""
    t = parse_one(signature={"x": {"dtype": "int32"}, "y": {"shape": [], "dtype": "uint8"}})
    assert t.sampler == SelectorSpec("uniform")
    assert t.remover == SelectorSpec("fifo")
    assert t.rate_limiter == RateLimiterSpec("min_size", 1.0, 1, -math.inf, math.inf)
    assert t.max_times_sampled == 0
    assert t.signature == (FieldSpec("x", (), "int32"), FieldSpec("y", (), "uint8"))
    assert t.signature[0].nbytes == 4 and t.row_bytes == 5
    assert parse_config({"table": [table()]}).server == ServerSpec()
    assert ServerSpec().name == "default" and ServerSpec().max_clients == 64


@pytest.mark.parametrize(
    "max_size,headroom",
    [(1, 64), (63, 64), (64, 64), (100, 100), (8192, 8192), (8193, 8192), (10**6, 8192)],
)
def test_default_headroom(max_size, headroom):
    """headroom defaults to max(64, min(max_size, 8192)); an explicit value is kept."""
    t = parse_one(max_size=max_size)
    assert t.headroom == headroom
    assert t.num_slots == max_size + headroom
    assert parse_one(max_size=max_size, headroom=5).headroom == 5


def test_max_times_sampled_zero_or_less_means_unlimited():
    """max_times_sampled ≤ 0 is stored as 0 (unlimited); a positive value is kept."""
    assert parse_one(max_times_sampled=-3).max_times_sampled == 0
    assert parse_one(max_times_sampled=4).max_times_sampled == 4


# -- frozen specs and round trips ------------------------------------------------------------------


def test_specs_are_frozen():
    """Specs cannot be changed after validation."""
    cfg = shmreplay.load_config(EXAMPLE)
    t = cfg.tables[0]
    for obj, attr, value in [
        (cfg, "tables", ()),
        (cfg.server, "name", "other"),
        (t, "max_size", 5),
        (t.signature[0], "shape", (9,)),
        (t.sampler, "priority_exponent", 1.0),
        (t.rate_limiter, "min_size_to_sample", 1),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, value)
    assert t.max_size == 1_000_000 and t.signature[0].shape == (8,)


LIMITERS = {
    "min_size": RateLimiterSpec.min_size(10),
    "sample_to_insert_ratio": RateLimiterSpec.sample_to_insert_ratio(2.0, 100, 50.0),
    "sample_to_insert_ratio_bounds": RateLimiterSpec.sample_to_insert_ratio(0.5, 10, (-3.0, 40.0)),
    "queue": RateLimiterSpec.queue(7),
    "stack": RateLimiterSpec.stack(7),
    "custom": RateLimiterSpec.custom(1.5, 3, -10.0, 20.0),
}


@pytest.mark.parametrize("limiter", LIMITERS.values(), ids=list(LIMITERS))
def test_to_dict_from_dict_round_trip(limiter):
    """from_dict(to_dict()) gives the spec back, also through msgpack as the segment stores it."""
    spec = TableSpec(
        "t",
        50,
        (FieldSpec("obs", (2, 3), "float16"), FieldSpec("a", (), "int64")),
        SelectorSpec.prioritized(0.7),
        SelectorSpec.fifo(),
        limiter,
        max_times_sampled=2,
    )
    assert TableSpec.from_dict(spec.to_dict()) == spec
    packed = msgpack.unpackb(msgpack.packb(spec.to_dict()))
    assert TableSpec.from_dict(packed) == spec
    assert TableSpec.from_dict(packed).rate_limiter.kind == limiter.kind


# -- queue and stack tables ------------------------------------------------------------------------


def test_queue_table_expands():
    """kind = "queue": fifo sampler and remover, each item sampled once, queue limiter."""
    t = parse_one(kind="queue", max_size=10)
    assert t.sampler == SelectorSpec.fifo() and t.remover == SelectorSpec.fifo()
    assert t.max_times_sampled == 1
    assert t.rate_limiter == RateLimiterSpec.queue(10)
    rl = t.rate_limiter
    assert (rl.kind, rl.samples_per_insert, rl.min_size_to_sample) == ("queue", 1.0, 1)
    assert (rl.min_diff, rl.max_diff) == (0.0, 10.0)


def test_stack_limiter_numbers():
    """The stack preset has the queue's numbers under its own kind."""
    rl = RateLimiterSpec.stack(12)
    assert (rl.kind, rl.samples_per_insert, rl.min_size_to_sample) == ("stack", 1.0, 1)
    assert (rl.min_diff, rl.max_diff) == (0.0, 12.0)


def test_stack_table_expands():
    """kind = "stack": lifo sampler and remover, each item sampled once, stack limiter."""
    t = parse_one(kind="stack", max_size=10)
    assert t.sampler == SelectorSpec.lifo() and t.remover == SelectorSpec.lifo()
    assert t.max_times_sampled == 1
    assert t.rate_limiter == RateLimiterSpec.stack(10)


@pytest.mark.parametrize("key", ["sampler", "remover", "rate_limiter", "max_times_sampled"])
def test_queue_table_refuses_keys_it_sets_itself(key):
    """A queue table with its own sampler/remover/limiter/max_times_sampled is a mistake."""
    value = {
        "sampler": {"kind": "fifo"},
        "remover": {"kind": "fifo"},
        "rate_limiter": {"kind": "queue", "size": 100},
        "max_times_sampled": 1,
    }[key]
    with pytest.raises(ConfigError, match=rf"'replay'.*'{key}'"):
        parse_one(kind="queue", **{key: value})


def test_unknown_table_kind():
    with pytest.raises(ConfigError, match=r"'kind'.*'heap'.*'queue', 'stack'"):
        parse_one(kind="heap")


# -- sample_to_insert_ratio ------------------------------------------------------------------------


def test_sample_to_insert_ratio_numbers():
    """min_diff = spi·m − e and max_diff = spi·m + e; [lo, hi] is taken as given."""
    rl = RateLimiterSpec.sample_to_insert_ratio(2.0, 100, 50.0)
    assert (rl.kind, rl.samples_per_insert, rl.min_size_to_sample) == (
        "sample_to_insert_ratio",
        2,
        100,
    )
    assert (rl.min_diff, rl.max_diff) == (150.0, 250.0)
    rl = RateLimiterSpec.sample_to_insert_ratio(0.25, 8, [-10, 400])
    assert (rl.min_diff, rl.max_diff) == (-10.0, 400.0)
    # The same through tables.toml.
    t = parse_one(
        rate_limiter={
            "kind": "sample_to_insert_ratio",
            "samples_per_insert": 4,
            "min_size_to_sample": 10,
            "error_buffer": 5.5,
        }
    )
    assert t.rate_limiter == RateLimiterSpec("sample_to_insert_ratio", 4.0, 10, 34.5, 45.5)
    t = parse_one(
        rate_limiter={
            "kind": "sample_to_insert_ratio",
            "samples_per_insert": 1,
            "min_size_to_sample": 3,
            "error_buffer": [0, 100],
        }
    )
    assert (t.rate_limiter.min_diff, t.rate_limiter.max_diff) == (0.0, 100.0)


def test_sample_to_insert_ratio_boundaries_are_accepted():
    """max_diff − min_diff exactly 2·max(1, spi), and min_diff exactly spi·m, are allowed."""
    assert RateLimiterSpec.sample_to_insert_ratio(3.0, 10, 3.0).max_diff == 33.0
    assert RateLimiterSpec.sample_to_insert_ratio(0.5, 10, 1.0).min_diff == 4.0
    assert RateLimiterSpec.sample_to_insert_ratio(2.0, 100, (200.0, 204.0)).min_diff == 200.0


BAD_RATIOS = [
    ("spi 0", (0.0, 10, 100.0), "samples_per_insert"),
    ("spi negative", (-1.0, 10, 100.0), "samples_per_insert"),
    ("spi nan", (math.nan, 10, 100.0), "samples_per_insert"),
    ("spi inf", (math.inf, 10, 100.0), "samples_per_insert"),
    ("m 0", (1.0, 0, 100.0), "min_size_to_sample"),
    ("m negative", (1.0, -4, 100.0), "min_size_to_sample"),
    ("m float", (1.0, 2.5, 100.0), "min_size_to_sample"),
    ("error_buffer negative", (1.0, 10, -1.0), "error_buffer"),
    ("buffer < 2·spi", (3.0, 10, 2.9), "error_buffer too small"),
    ("buffer < 2", (0.5, 10, 0.99), "error_buffer too small"),
    ("bounds < 2·spi", (2.0, 10, (0.0, 3.9)), "error_buffer too small"),
    ("bounds reversed", (1.0, 10, (20.0, 0.0)), "error_buffer too small"),
    ("min_diff > spi·m", (2.0, 100, (201.0, 400.0)), "exceeds"),
    ("bounds NaN", (1.0, 10, (math.nan, 10.0)), "error_buffer"),
    ("bounds both -inf", (1.0, 10, (-math.inf, -math.inf)), "error_buffer too small"),
    ("three bounds", (1.0, 10, (0.0, 5.0, 9.0)), r"\[min_diff, max_diff\]"),
]


@pytest.mark.parametrize("args,match", [c[1:] for c in BAD_RATIOS], ids=[c[0] for c in BAD_RATIOS])
def test_sample_to_insert_ratio_refusals(args, match):
    """Reverb's constructor checks are ConfigErrors, both from the preset and from tables.toml."""
    with pytest.raises(ConfigError, match=match):
        RateLimiterSpec.sample_to_insert_ratio(*args)
    spi, m, e = args
    rl = {
        "kind": "sample_to_insert_ratio",
        "samples_per_insert": spi,
        "min_size_to_sample": m,
        "error_buffer": list(e) if isinstance(e, tuple) else e,
    }
    with pytest.raises(ConfigError, match=r"test\.toml: table 'replay', key 'rate_limiter"):
        parse_one(rate_limiter=rl)


def test_custom_limiter_checks():
    """The general form refuses spi ≤ 0, m < 1 and min_diff > max_diff."""
    assert RateLimiterSpec.custom(1, 1, 0, 0) == RateLimiterSpec("custom", 1.0, 1, 0.0, 0.0)
    for args in [(0, 1, 0, 1), (1, 0, 0, 1), (1, 1, 2, 1), (math.inf, 1, 0, 1)]:
        with pytest.raises(ConfigError):
            RateLimiterSpec.custom(*args)
    rl = {"kind": "custom", "min_size_to_sample": 1, "min_diff": 0, "max_diff": 10}
    assert parse_one(rate_limiter={**rl, "samples_per_insert": 2}).rate_limiter == (
        RateLimiterSpec("custom", 2.0, 1, 0.0, 10.0)
    )
    # An infinite ratio used to be accepted, then crashed the limiter's first sample_allowance.
    with pytest.raises(ConfigError, match=r"'replay', key 'rate_limiter'.*samples_per_insert"):
        parse_one(rate_limiter={**rl, "samples_per_insert": math.inf})


@pytest.mark.parametrize("bad", [0, -1, 1.0, True])
def test_size_presets_refuse_non_positive_integers(bad):
    for preset in (RateLimiterSpec.min_size, RateLimiterSpec.queue, RateLimiterSpec.stack):
        with pytest.raises(ConfigError, match="integer ≥ 1"):
            preset(bad)


# -- bad files -------------------------------------------------------------------------------------

SIG = '[table.signature]\nobs = { shape = [8], dtype = "float32" }\n'


def toml_table(body: str = "", *, name: str = '"replay"', sig: str = SIG) -> str:
    """One [[table]] section: ``body`` goes before the signature sub-table."""
    head = f"name = {name}\n" if name is not None else ""
    return f"[[table]]\n{head}max_size = 100\n{body}\n{sig}"


def drop_line(text: str, prefix: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith(prefix)) + "\n"


GOOD = toml_table()

BAD_FILES = [
    # (id, file text or None for no file, substrings the message must contain)
    ("unknown section", '[servr]\nname = "x"\n' + GOOD, ["'servr'", "[server]", "[[table]]"]),
    (
        "unknown table key",
        toml_table("max_times_sampeld = 1"),
        ["'replay'", "'max_times_sampeld'", "max_times_sampled", "allowed"],
    ),
    ("missing name", toml_table(name=None), ["table #1", "'name'", "required"]),
    ("missing max_size", drop_line(GOOD, "max_size"), ["'replay'", "'max_size'", "required"]),
    ("max_size 0", GOOD.replace("= 100", "= 0"), ["'replay'", "'max_size'", "≥ 1", "got 0"]),
    ("max_size negative", GOOD.replace("= 100", "= -5"), ["'replay'", "'max_size'", "got -5"]),
    ("max_size float", GOOD.replace("= 100", "= 100.0"), ["'replay'", "'max_size'", "got 100.0"]),
    ("max_size bool", GOOD.replace("= 100", "= true"), ["'replay'", "'max_size'", "got True"]),
    (
        "unknown selector",
        toml_table('sampler = { kind = "prioritised", priority_exponent = 0.6 }'),
        ["'replay'", "'sampler.kind'", "'prioritised'", "uniform, prioritized, fifo"],
    ),
    (
        "unknown remover",
        toml_table('remover = { kind = "oldest" }'),
        ["'replay'", "'remover.kind'", "'oldest'", "allowed: uniform, prioritized, fifo"],
    ),
    (
        "prioritized without exponent",
        toml_table('sampler = { kind = "prioritized" }'),
        ["'replay'", "'sampler.priority_exponent'", "required"],
    ),
    (
        "negative exponent",
        toml_table('sampler = { kind = "prioritized", priority_exponent = -0.5 }'),
        ["'replay'", "'sampler.priority_exponent'", "≥ 0", "-0.5"],
    ),
    (
        "unknown limiter",
        toml_table('rate_limiter = { kind = "ratio" }'),
        ["'replay'", "'rate_limiter.kind'", "'ratio'", "min_size, sample_to_insert_ratio"],
    ),
    (
        "missing limiter key",
        toml_table(
            'rate_limiter = { kind = "sample_to_insert_ratio", samples_per_insert = 2.0, '
            "min_size_to_sample = 10 }"
        ),
        ["'replay'", "'rate_limiter.error_buffer'", "required"],
    ),
    (
        "unknown dtype",
        toml_table(sig='[table.signature]\nobs = { shape = [8], dtype = "float" }\n'),
        ["'replay'", "'signature.obs.dtype'", "'float'", "float32", "int64", "bool"],
    ),
    (
        "negative shape",
        toml_table(sig='[table.signature]\nobs = { shape = [8, -1], dtype = "float32" }\n'),
        ["'replay'", "'signature.obs.shape'", "integers ≥ 1", "[8, -1]"],
    ),
    (
        "shape not a list",
        toml_table(sig='[table.signature]\nobs = { shape = 8, dtype = "float32" }\n'),
        ["'replay'", "'signature.obs.shape'", "list", "got 8"],
    ),
    ("empty signature", toml_table(sig="[table.signature]\n"), ["'replay'", "'signature'"]),
    ("missing signature", toml_table(sig=""), ["'replay'", "'signature'", "required"]),
    ("duplicate name", GOOD + GOOD, ["'replay'", "defined twice"]),
    ("bad name", toml_table(name='"a/b"'), ["'a/b'", "'name'", "letters, digits"]),
    ("invalid TOML", "[[table]]\nname = \nmax_size = 100\n", ["not valid TOML", "line 2"]),
    ("missing file", None, ["no such file"]),
    ("no tables", '[server]\nname = "x"\n', ["no tables", "[[table]]"]),
    ("server unknown key", '[server]\nnmae = "x"\n' + GOOD, ["'server.nmae'", "max_clients"]),
    (
        "server max_clients 0",
        "[server]\nmax_clients = 0\n" + GOOD,
        ["'server.max_clients'", "≥ 1", "got 0"],
    ),
]


@pytest.mark.parametrize("text,needles", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_files(tmp_path, text, needles):
    """Each mistake is one ConfigError naming the file, the table, the key and what is allowed."""
    path = tmp_path / "my-tables.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        shmreplay.load_config(path)
    err = ei.value
    assert isinstance(err, ValueError) and isinstance(err, shmreplay.ShmReplayError)
    msg = str(err)
    assert msg.startswith(f"{path}: ")
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_good_file_written_like_the_bad_ones_loads(tmp_path):
    """The base text the bad files are derived from is itself valid (so each case has one fault)."""
    path = tmp_path / "t.toml"
    path.write_text("[server]\nmax_clients = 1\n" + GOOD + GOOD.replace('"replay"', '"b-2_X"'))
    cfg = shmreplay.load_config(str(path))
    assert [t.name for t in cfg.tables] == ["replay", "b-2_X"]
    assert cfg.server.max_clients == 1
