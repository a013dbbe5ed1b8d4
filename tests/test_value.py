"""The Value API in one process: types, errors, properties."""

import os

import pytest

import shmemext
from conftest import block_bytes, linux_only, shm_path


def test_new_block_reads_empty_str(name):
    with shmemext.Value(name) as v:
        assert v.created
        assert v.get() == ""
        assert type(v.get()) is str
        assert v.version == 0
        assert v.capacity == shmemext.DEFAULT_CAPACITY == 4096


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plain ascii",
        "caf\xe9 latin-1",
        "\u20ac uses two bytes",
        "\U0001f600 uses four bytes",
        "\x00 embedded nul \x00",
        "\ud800 lone surrogate",
        b"",
        b"\x00\xff raw bytes",
    ],
)
def test_round_trip_keeps_type_and_content(name, value):
    with shmemext.Value(name) as v:
        v.set(value)
        got = v.get()
        assert got == value
        assert type(got) is type(value)


def test_str_subclass_and_bytes_likes(name):
    class S(str):
        pass

    with shmemext.Value(name) as v:
        v.set(S("sub"))
        assert type(v.get()) is str and v.get() == "sub"
        for obj in (bytearray(b"ba"), memoryview(b"mv"), memoryview(bytearray(b"xyz"))[1:]):
            v.set(obj)
            assert v.get() == bytes(obj)
            assert type(v.get()) is bytes
        import array

        v.set(array.array("i", [1, 2]))
        assert v.get() == array.array("i", [1, 2]).tobytes()


def test_got_strings_behave_like_native_ones(name):
    with shmemext.Value(name) as v:
        for text in ("ascii", "caf\xe9", "\u20ac", "\U0001f600x"):
            v.set(text)
            got = v.get()
            assert got == text and hash(got) == hash(text)
            assert {text: 1}[got] == 1
            assert got.encode("utf-8", "surrogatepass") == text.encode("utf-8", "surrogatepass")


def test_version_counts_sets(name):
    with shmemext.Value(name) as v:
        for i in range(1, 6):
            v.set(str(i))
            assert v.version == i


def test_capacity_is_enforced_with_both_sizes_named(name):
    with shmemext.Value(name, 16) as v:
        v.set(b"x" * 16)
        with pytest.raises(ValueError, match=r"17 bytes does not fit the capacity of 16 bytes"):
            v.set(b"x" * 17)
        v.set("\U0001f600" * 4)  # 4 code units of 4 bytes
        with pytest.raises(ValueError, match=r"20 bytes .* capacity of 16 bytes"):
            v.set("\U0001f600" * 5)
        assert v.get() == "\U0001f600" * 4, "a refused set leaves the value alone"


def test_bad_types(name):
    with shmemext.Value(name) as v:
        for bad in (1, 1.5, None, ["x"], object()):
            with pytest.raises(TypeError, match="str or a bytes-like object"):
                v.set(bad)
        strided = memoryview(b"abcdef")[::2]
        with pytest.raises(TypeError, match="contiguous"):
            v.set(strided)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("", "is empty"),
        ("a/b", "character outside"),
        ("../etc", "starts with"),
        (".hidden", "starts with"),
        ("-opt", "starts with"),
        ("nul\x00x", "character outside"),
        ("caf\xe9", "character outside"),
        ("x" * 201, "too long"),
    ],
)
def test_bad_names(bad, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        shmemext.Value(bad)
    assert "[A-Za-z0-9_.-]" in str(info.value) and "200" in str(info.value)


def test_name_must_be_str():
    with pytest.raises(TypeError, match="name must be str"):
        shmemext.Value(b"bytes-name")


@pytest.mark.parametrize("capacity", [0, -1, 1 << 60])
def test_bad_capacity_values(name, capacity):
    with pytest.raises(ValueError, match="capacity .* out of range: it must be between 1 and"):
        shmemext.Value(name, capacity)


@pytest.mark.parametrize("capacity", ["4096", 4096.0, True])
def test_bad_capacity_types(name, capacity):
    with pytest.raises(TypeError, match="capacity must be int or None"):
        shmemext.Value(name, capacity)


def test_bad_mode(name):
    with pytest.raises(ValueError, match="mode 0o1777 is out of range: it must be between 0 and 0o777"):
        shmemext.Value(name, mode=0o1777)
    with pytest.raises(ValueError, match="mode -1 is out of range"):
        shmemext.Value(name, mode=-1)
    for opener in (lambda m: shmemext.Value(name, mode=m), lambda m: shmemext.Segment(name, 64, mode=m)):
        with pytest.raises(TypeError, match="argument 'mode' must be an int of permission bits such as 0o600, not str"):
            opener("0600")


def test_existing_block_keeps_its_capacity(name):
    with shmemext.Value(name, 100) as first:
        with shmemext.Value(name) as second:
            assert not second.created and second.capacity == 100
        with shmemext.Value(name, 50) as third:
            assert third.capacity == 100
        with pytest.raises(ValueError, match="capacity of 100 bytes, less than the 200 bytes asked for"):
            shmemext.Value(name, 200)
        assert first.capacity == 100


def test_closed_value_raises_everywhere(name):
    v = shmemext.Value(name)
    v.close()
    v.close()  # idempotent
    assert v.closed
    assert "closed" in repr(v)
    for op in (v.get, lambda: v.set("x"), lambda: v.version, lambda: v.persist, v.__enter__):
        with pytest.raises(ValueError, match="closed"):
            op()
    assert v.name == name


def test_repr_and_properties(name):
    with shmemext.Value(name, 64) as v:
        v.set("x")
        assert repr(v) == f"<shmemext.Value name='{name}' capacity=64 version=1>"
        assert v.name == name and not v.persist and not v.closed
    assert v.closed


@linux_only
def test_new_block_mode_is_private(name):
    with shmemext.Value(name):
        assert os.stat(shm_path(name)).st_mode & 0o777 == 0o600


def test_explicit_mode_is_applied_despite_umask(name):
    old = os.umask(0o077)
    try:
        with shmemext.Value(name, mode=0o640):
            assert os.stat(shm_path(name)).st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@linux_only
def test_foreign_object_is_refused_not_overwritten(name):
    with open(shm_path(name), "wb") as f:
        f.write(b"somebody else's data" + b"\x01" * 9000)
    try:
        with pytest.raises(shmemext.ForeignBlockError, match="is not a shmemext block"):
            shmemext.Value(name)
        with open(shm_path(name), "rb") as f:
            assert f.read(20) == b"somebody else's data"
    finally:
        os.unlink(shm_path(name))


def _poke(block, offset, data):
    with block_bytes(block) as memory:
        memory[offset : offset + len(data)] = data


SLOT0 = 4096  # data of slot 0; header page first
SLOT1_META = 320


def test_corrupt_text_is_refused_not_built(name):
    with shmemext.Value(name, 64) as v:
        v.set("abc")  # version 1: slot 1
        _poke(name, SLOT0 + 64 + 1, b"\xe9")  # slot 1's data, now not ASCII
        with pytest.raises(ValueError, match="corrupt value"):
            v.get()
        v.set("\u20ac\u20ac")  # version 2: slot 0, UCS-2
        _poke(name, SLOT0, b"A\x00B\x00")  # now fits Latin-1: not canonical
        with pytest.raises(ValueError, match="corrupt value"):
            v.get()
        v.set("ok")
        assert v.get() == "ok"


def test_hostile_length_is_refused(name):
    with shmemext.Value(name, 64) as v:
        v.set(b"abc")  # slot 1
        _poke(name, SLOT1_META + 16, (1 << 40).to_bytes(8, "little"))
        with pytest.raises(ValueError, match="impossible length"):
            v.get()


def test_module_level_set_get_use_the_default_block():
    assert shmemext.default is not None
    assert shmemext.default.name == os.environ["SHMEMEXT_NAME"]
    shmemext.set("module level")
    assert shmemext.get() == "module level"
    assert shmemext.default.get() == "module level"
    shmemext.set(b"\x00")
    assert shmemext.get() == b"\x00"


def test_signatures_are_introspectable():
    import inspect

    assert str(inspect.signature(shmemext.get)) == "()"
    assert str(inspect.signature(shmemext.set)) == "(value, /)"
    assert str(inspect.signature(shmemext.Value.get)) == "(self, /)"
    assert "persist=False" in str(inspect.signature(shmemext.Value))


def test_scope_global_is_the_same_namespace_on_posix(name):
    # Windows names it in Global\ (every session); POSIX names are machine-wide already.
    with shmemext.Value(name, 64, scope="global") as a, shmemext.Value(name, scope="session") as b:
        a.set("one block")
        assert b.get() == "one block" and not b.created
    with pytest.raises(ValueError, match="scope must be 'session' or 'global', not 'everywhere'"):
        shmemext.Value(name, scope="everywhere")
    with pytest.raises(ValueError, match="scope must be"):
        shmemext.Segment(name, 64, scope="machine")


def test_a_windows_security_descriptor_is_refused_with_a_pointer_to_mode(name):
    for make in (lambda: shmemext.Value(name, security="D:P(A;;GA;;;WD)"),
                 lambda: shmemext.Segment(name, 64, security="D:P(A;;GA;;;WD)")):
        with pytest.raises(ValueError, match=r"Windows SDDL descriptor; on this system use mode="):
            make()
    with pytest.raises(TypeError):
        shmemext.Value(name, security=3)


def test_a_shared_memory_block_of_another_library_is_refused_never_wiped(name):
    # multiprocessing.shared_memory's blocks start with whatever their user put
    # there: zeros, often, which once read as an unfinished block of ours.
    from multiprocessing import shared_memory

    other = shared_memory.SharedMemory(name, create=True, size=8192)
    try:
        other.buf[100:104] = b"data"
        for opener in (lambda: shmemext.Value(name), lambda: shmemext.Segment(name, 64)):
            with pytest.raises(ValueError, match="is not a shmemext|another program"):
                opener()
        assert bytes(other.buf[100:104]) == b"data" and bytes(other.buf[:8]) == bytes(8)
        again = shared_memory.SharedMemory(name)   # still there under its name
        again.close()
    finally:
        other.close()
        other.unlink()


def test_errors_of_shmemext_are_value_errors_of_their_own_kind(name):
    assert issubclass(shmemext.Error, ValueError)
    for sub in (shmemext.ForeignBlockError, shmemext.CorruptBlockError, shmemext.ClosedError):
        assert issubclass(sub, shmemext.Error)
    v = shmemext.Value(name, 64)
    with pytest.raises(shmemext.Error, match="does not fit the capacity"):
        v.set(b"x" * 65)
    with pytest.raises(shmemext.Error, match="is a value cell, not a raw segment"):
        shmemext.Segment(name, 64)
    v.set("abc")
    _poke(name, SLOT0 + 64 + 1, b"\xe9")   # slot 1's data, now not ASCII
    with pytest.raises(shmemext.CorruptBlockError, match="corrupt value"):
        v.get()
    v.close()
    with pytest.raises(shmemext.ClosedError, match="is closed"):
        v.get()
    with pytest.raises(shmemext.ClosedError):
        _ = v.version


def test_set_if_sets_only_the_expected_version(name):
    v = shmemext.Value(name, 64)
    assert v._set_if("a", 0) == 1
    assert v._set_if("b", 0) is None and v.get() == "a"
    assert v._set_if(b"c", 1) == 2 and v.get() == b"c"
    with pytest.raises(ValueError, match="does not fit"):
        v._set_if(b"x" * 65, 2)
    with pytest.raises(OverflowError):
        v._set_if("x", -1)
    v.close()
    with pytest.raises(shmemext.ClosedError):
        v._set_if("x", 2)
