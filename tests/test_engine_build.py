"""The compiled engine is built and loads: one implementation runs, with C11 atomics."""

from shmreplay.engine import _native


def test_engine_is_compiled_with_lock_free_c11_atomics():
    info = _native.build_info()
    assert info["c_standard"] >= 201112
    assert info["atomics"] == "lock-free"
    assert _native.__file__.endswith(".so")
