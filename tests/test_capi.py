"""The C API, used by a consumer extension compiled here against get_include() only."""

import gc
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time

import pytest

import shmemext
from conftest import FORK_WHILE_CLOSING, block_exists, python

HERE = os.path.dirname(os.path.abspath(__file__))
CMODULE = os.path.join(HERE, "cmodule")
WARNINGS = ["-Wall", "-Wextra", "-Werror"]


def compiler(cxx=False):
    cc = shutil.which("g++" if cxx else "cc") or shutil.which("c++" if cxx else "gcc")
    assert cc, "a C/C++ compiler is needed to build the consumer extension"
    return cc


def includes():
    # Python's headers and shmemext's: nothing from this source tree.
    return ["-I" + sysconfig.get_paths()["include"], "-I" + shmemext.get_include()]


def build_consumer(out_dir, *defines):
    target = os.path.join(out_dir, "consumer" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [compiler(), "-shared", "-fPIC", "-O2", "-std=c11", "-D_GNU_SOURCE", *WARNINGS, *includes(), *defines,
           os.path.join(CMODULE, "consumer.c"), os.path.join(CMODULE, "work.c"), "-o", target, "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return target


def load(path):
    spec = importlib.util.spec_from_file_location("consumer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    return load(build_consumer(str(tmp_path_factory.mktemp("consumer"))))


def test_get_include_holds_only_the_public_header():
    assert os.listdir(shmemext.get_include()) == ["shmemext.h"]


def test_the_consumer_sets_the_default_block_a_separate_process_reads_it(consumer):
    name = consumer.default_set("caf\xe9 \u20ac \U0001f600 from C")
    assert name == shmemext.default.name
    assert shmemext.get() == "caf\xe9 \u20ac \U0001f600 from C"
    assert python("import shmemext; print(shmemext.get())").stdout == "caf\xe9 \u20ac \U0001f600 from C\n"


def test_the_consumer_reads_what_python_set(consumer, name):
    with shmemext.Value(name, 64) as v:
        for value in ("ascii", "caf\xe9", "\u20ac\u20ac", "\U0001f600", "", b"\x00raw\xff"):
            v.set(value)
            got, version, created = consumer.named_get(name, 64)
            assert got == value and type(got) is type(value) and version == v.version and not created
        v.set("\U0001f600" * 4)
        assert consumer.named_get(name, 15) == ("too small", 16, None), "the UTF-8 length needed"


def test_python_objects_and_the_c_api_share_one_block(consumer, name):
    with shmemext.Value(name) as v:
        assert consumer.object_set(v, b"through the object") == 1
        assert v.get() == b"through the object"
        code, message = consumer.close_foreign(v)
        assert code == 13 and "is closed" in message, "close() refuses handles it did not make"
        assert not v.closed and v.get() == b"through the object"
        with pytest.raises(TypeError, match="expected a shmemext.Value, Segment or Queue"):
            consumer.object_set(42, b"x")
    with pytest.raises(ValueError, match="closed"):
        consumer.object_set(v, b"x")


def test_the_consumer_uses_a_raw_segment_pointer(consumer, name):
    with shmemext.Segment(name, 1000) as seg:
        total, size, created = consumer.segment_fill(name, 1000, 7)
        assert (total, size, created) == (7000, 1000, False)
        assert seg.read() == b"\x07" * 1000


def test_copies_without_the_gil_from_several_threads(consumer, name):
    with shmemext.Value(name) as v:
        bad, failed = consumer.threaded_copies(name, 4, 20000, 4096)
        assert (bad, failed) == (0, 0)
        assert v.version == 4 * 20000


def test_shmemext_existing_opens_only_a_live_block(consumer, name):
    with pytest.raises(OSError, match=rf"error 21: block '{name}': does not exist"):
        consumer.named_get(name, 10, True)
    assert not block_exists(name), "a refused open makes nothing"
    with shmemext.Value(name) as v:
        v.set("there")
        assert consumer.named_get(name, 10, True) == ("there", 1, False)


def test_errors_come_back_as_codes_with_messages(consumer, name):
    with pytest.raises(OSError, match=r"error 2: block '\.\./x': it starts with"):
        consumer.named_get("../x", 10)
    with shmemext.Segment(name, 10):
        with pytest.raises(OSError, match=r"error 7: .* is a raw segment, not a value cell"):
            consumer.named_get(name, 10)


def test_a_consumer_built_for_a_newer_api_fails_to_import_clearly(tmp_path):
    path = build_consumer(str(tmp_path), "-DSHMEMEXT_CAPI_VERSION=99")
    with pytest.raises(ImportError, match=r"needs version 99 of the shmemext C API, but the installed "
                                          r"shmemext provides version 3: upgrade shmemext"):
        load(path)


@pytest.mark.parametrize("lang", ["c", "c++"])
def test_the_header_compiles_cleanly(tmp_path, lang):
    std = "-std=c11" if lang == "c" else "-std=c++17"
    cmd = [compiler(lang == "c++"), "-x", lang, std, *WARNINGS, *includes(), "-c",
           os.path.join(CMODULE, "header_check.c"), "-o", str(tmp_path / "check.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_c_api_waits_without_the_gil(consumer, name):
    with shmemext.Value(name) as v:
        assert consumer.wait_change(name, 0, 50) is None, "a timeout"
        threading.Timer(0.2, lambda: v.set("now")).start()
        t0 = time.monotonic()
        assert consumer.wait_change(name, 0, 10_000) == 1
        assert time.monotonic() - t0 < 5


def test_ctrl_c_interrupts_a_set_waiting_for_the_writer_lock(consumer, name):
    """A set() that waits for a writer lock another process holds (here through
    the C API) gives way to Ctrl-C promptly, and the value is untouched."""
    import signal

    with shmemext.Value(name, 64) as v:
        v.set("before")
        holder = threading.Thread(target=consumer.lock_for, args=(v, 4.0))
        holder.start()
        time.sleep(0.2)
        script = """
        import sys, time, shmemext
        v = shmemext.Value(sys.argv[1])
        print("ready", flush=True)
        t0 = time.monotonic()
        try:
            v.set("never")
            print("set returned")
        except KeyboardInterrupt:
            print(f"interrupted after {time.monotonic() - t0:.2f}s", flush=True)
        """
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), name], stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline() == "ready\n"
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=30)
        holder.join()
        assert out.startswith("interrupted after"), out
        assert float(out.split()[-1].rstrip("s")) < 2.0, "well before the lock was let go (4 s)"
        assert v.get() == "before" and v.version == 1
        v.set("after")   # the lock is free and whole
        assert v.get() == "after"


def test_misuse_through_the_c_api_is_a_result_code_not_a_crash(consumer, name):
    E_CLOSED, E_OK = 13, 0
    first, second, empty_get, length = consumer.misuse(name)
    assert (first, second) == (E_OK, E_CLOSED), "a second close() is refused, not a double free"
    assert (empty_get, length) == (E_OK, 0), "an empty value needs no buffer"
    v = shmemext.Value(name + "-py")
    v.set(b"abc")
    assert consumer.after_close(v) == (E_CLOSED, E_CLOSED, 0), "a block Python closed is E_CLOSED to C"


def test_the_import_error_of_a_consumer_names_the_real_cause(consumer):
    code = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("consumer", sys.argv[1])
try:
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
except ImportError as e:
    print(type(e.__cause__).__name__, "|", e)
"""
    proc = python(code, consumer.__file__, env={"SHMEMEXT_NAME": "bad/name"})
    cause, _, message = proc.stdout.partition(" | ")
    assert cause == "ValueError", proc.stdout
    assert "importing shmemext failed" in message and "bad/name" in message, message


def test_a_signal_handler_can_close_a_value_whose_set_it_interrupted(consumer, name):
    """close() from a SIGALRM handler while the same thread's set() waits for a
    writer lock (held here through the C API): close returns, the set() ends
    with ClosedError, and the block is detached."""
    with shmemext.Value(name, 64) as v:
        v.set("before")
        holder = threading.Thread(target=consumer.lock_for, args=(v, 3.0))
        holder.start()
        time.sleep(0.2)
        script = """
        import signal, sys, time, shmemext
        v = shmemext.Value(sys.argv[1])
        signal.signal(signal.SIGALRM, lambda *a: v.close())
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        t0 = time.monotonic()
        try:
            v.set("never")
        except shmemext.ClosedError:
            print(f"closed {v.closed} after {time.monotonic() - t0:.2f}s", flush=True)
        """
        out = python(script, name, timeout=30).stdout
        holder.join()
        assert out.startswith("closed True after"), out
        assert float(out.split()[-1].rstrip("s")) < 2.0, "well before the lock was let go (3 s)"
        assert v.get() == "before" and v.holders in (1, None)   # None: the OS cannot count (lock files)


E_OK, E_CLOSED, E_BUSY = 0, 13, 20


def test_acquire_keeps_a_python_object_open_and_alive_until_release(consumer, name):
    v = shmemext.Value(name, 64)
    assert consumer.pin(v) == E_OK
    with pytest.raises(BufferError, match=r"1 C extension handle\(s\) \(ShmemExtAPI->acquire\) still hold it"):
        v.close()
    del v   # the pin holds the object: the handle stays valid
    gc.collect()
    assert consumer.use_kept("through a kept handle") == (E_OK, E_OK, name)
    assert not os.path.exists(f"/dev/shm/{name}"), "released: the object went, and with it the block"


def test_acquire_and_release_are_counted_and_checked(consumer, name):
    with shmemext.Value(name, 64) as v:
        assert consumer.pin(v) == E_OK and consumer.pin(v) == E_OK
        assert consumer.unpin(v) == E_OK
        with pytest.raises(BufferError):
            v.close()
        assert consumer.unpin(v) == E_OK
        assert consumer.unpin(v) == E_CLOSED, "a release without an acquire changes nothing"
    assert v.closed
    with pytest.raises(shmemext.ClosedError):
        consumer.pin(v)


def test_an_acquired_open_handle_refuses_close_with_e_busy(consumer, name):
    assert consumer.heap_pins(name) == (E_OK, E_BUSY, E_OK, E_OK, E_CLOSED, E_OK)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_python_close_waits_for_c_threads_inside_calls_on_its_handle(consumer, name):
    """C threads copying (and waiting) through a Python object's handle while
    Python closes it: the close waits for each call, later calls get
    E_CLOSED, nothing else fails and nothing crashes."""
    for round_ in range(5):
        v = shmemext.Value(f"{name}", 4096)
        copies, other = consumer.copy_until_closed(v, 4, 0.05 + 0.02 * round_)
        assert other == 0 and copies > 0 and v.closed and v._inflight == 0


def readme_c_example():
    """The README's C consumer, verbatim."""
    with open(os.path.join(HERE, os.pardir, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("```c\n/* counter.c")
    return text[start + len("```c\n"):text.index("```", start + 4)]


def test_the_readme_c_example_publishes_to_another_process(tmp_path, name):
    """counter.c from the README, built with -Wall -Wextra -Werror (its block
    name swapped for this test's): one process imports it and publishes, a
    second reads the text while the first runs, and the block goes with it."""
    source = readme_c_example()
    assert source.count('"status"') == 1
    (tmp_path / "counter.c").write_text(source.replace('"status"', f'"{name}"'))
    target = tmp_path / ("counter" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [compiler(), "-shared", "-fPIC", "-O2", "-std=c11", *WARNINGS, *includes(), str(tmp_path / "counter.c"),
           "-o", str(target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    publisher = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            sys.path.insert(0, sys.argv[1])
            import counter
            counter.publish("caf\\u00e9 from C")
            print("published", flush=True)
            sys.stdin.readline()
        """), str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert publisher.stdout.readline() == "published\n"
        reader = subprocess.run([sys.executable, "-c", "import shmemext, sys; print(shmemext.Value(sys.argv[1]).get())",
                                 name], capture_output=True, text=True, timeout=60)
        assert reader.stdout == "caf\u00e9 from C\n", reader.stderr
    finally:
        publisher.communicate("\n", timeout=60)
    assert publisher.returncode == 0
    assert not os.path.exists(f"/dev/shm/{name}"), "the block goes with its last holder"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_c_api_calls_in_a_fork_child_of_a_closing_handle_do_not_hang(consumer, name):
    """The C API enters a Python object's handle its own way: in a fork()
    child whose parent was closing the object in another thread, it settles
    the inherited close too (closed, or still open) instead of waiting for it."""
    proc = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORK_WHILE_CLOSING, name, "60",
                           consumer.__file__], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    outcomes = eval(proc.stdout)
    assert outcomes["hung"] == 0 and outcomes["closed"] > 0, outcomes


def test_queue_put_and_get_through_the_c_api(consumer, name):
    with shmemext.Queue(name, 4096) as q:
        assert consumer.queue_pass(q, b"from C", 64) == (0, 0, b"from C", 0, 0, 6)
        q.put("caf\xe9 \u65e5")  # text: UTF-8 out; the buffer must hold its longest form first
        put, got, msg, is_text, is_pickle, need = consumer.queue_pass(q, b"", 8)
        assert (put, got, msg, need) == (0, 16, None, 18)  # SHMEMEXT_E_BUFFER, 6 units x 3
        assert q.qsize() == 1, "a message too large for the buffer stays in the queue"
        assert consumer.queue_pass(q, b"", 64) == (0, 0, "caf\xe9 \u65e5".encode(), 1, 0, 9)
        q.put({"pickled": True})
        put, got, msg, is_text, is_pickle, _ = consumer.queue_pass(q, b"", 256)
        assert got == 0 and is_pickle == 1 and pickle.loads(msg) == {"pickled": True}
        assert consumer.queue_pass(q, b"", 64)[1] == 22  # SHMEMEXT_E_EMPTY
        assert consumer.queue_pass(q, b"x" * 5000, 64)[0] == 9  # SHMEMEXT_E_TOOBIG
        q.put(b"to python")
        assert q.get() == b"to python"
        assert consumer.queue_named(name, 3) == 3
        assert q.get_many(5) == [b"c0", b"c1", b"c2"]
