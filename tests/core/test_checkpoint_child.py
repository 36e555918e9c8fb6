"""read_h5's child process: tf_model.h5 is parsed in a separate interpreter with a time limit.

libhdf5 can spin forever (uninterruptibly) or crash on a damaged file, so ``checkpoint.read_h5`` runs the parser
(``checkpoint._read_h5_in_process``) in ``python -I`` and reads the arrays back from .npy records. These tests
check that the child gives the same arrays and errors as the in-process parser, that a hang, a crash or garbage
from the child ends in an OSError naming the file, that temporary files never stay behind, that the child imports
no framework, and that it works whatever started the parent (``python -c``, a script without a ``__main__``
guard, the ``groupvit`` console entry point). Fake children stand in for a hanging or crashing libhdf5.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import pytest

from groupvit_core import checkpoint as ck
from tests.core.test_checkpoint import write_duplicate_key_h5

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "golden", "ckpt_tiny")


def assert_bit_identical(got, expected):
    assert list(got) == list(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's directory, checked to be empty again after the test."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    yield directory
    assert os.listdir(directory) == [], "read_h5 left temporary files behind"


def fake_child(monkeypatch, code):
    """Make read_h5 start ``python -c code workdir`` instead of the parser."""
    monkeypatch.setattr(ck, "_h5_child_command", lambda workdir: [sys.executable, "-c", code, workdir])


def test_child_gives_the_same_arrays_as_the_in_process_parser(private_tmp):
    path = os.path.join(GOLDEN, "tf_model.h5")
    assert_bit_identical(ck.read_h5(path), ck._read_h5_in_process(path))


def test_child_keeps_dtypes_shapes_and_byte_order(tmp_path, private_tmp):
    tensors = {
        "a/kernel": np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian in the file, native when read
        "b/scalar": np.array(2.5, np.float64),
        "c/half": np.array([1, -2, 3], np.float16),
        "d/int": np.array([[7]], np.int64),
        "e/flag": np.array([True, False]),
        "f/empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "tf_model.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"groupvit"]
        group = handle.create_group("groupvit")
        names = [f"m/groupvit/{key}:0" for key in tensors]
        group.attrs["weight_names"] = [name.encode() for name in names]
        for name, array in zip(names, tensors.values()):
            group.create_dataset(name, data=array)
    got = ck.read_h5(path)
    assert_bit_identical(got, ck._read_h5_in_process(str(path)))
    for key, array in tensors.items():
        assert got[key].dtype == array.dtype.newbyteorder("=") and got[key].dtype.isnative
        np.testing.assert_array_equal(got[key], array)


def test_parser_errors_come_back_with_their_type_and_message(tmp_path, private_tmp):
    duplicate = tmp_path / "dup.h5"
    write_duplicate_key_h5(duplicate)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as handle:
        handle["x"] = np.zeros(3)
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    for path in (duplicate, plain, text):
        with pytest.raises((ValueError, OSError)) as in_process:
            ck._read_h5_in_process(str(path))
        with pytest.raises((ValueError, OSError)) as in_child:
            ck.read_h5(path)
        assert type(in_child.value) is type(in_process.value), path
        assert str(in_child.value) == str(in_process.value), path
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        ck.read_h5(tmp_path / "missing.h5")


def test_a_hanging_child_is_killed_after_the_time_limit(tmp_path, private_tmp, monkeypatch):
    monkeypatch.setattr(ck, "_H5_TIMEOUT_S", 1.0)
    monkeypatch.setattr(ck, "_H5_TIMEOUT_PER_100MB_S", 0.0)
    pid_file = tmp_path / "pid"
    fake_child(monkeypatch, f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)")
    started = time.monotonic()
    with pytest.raises(OSError, match=r"tf_model.h5: took longer than 1 s to parse; the file is probably damaged"):
        ck.read_h5(os.path.join(GOLDEN, "tf_model.h5"))
    assert time.monotonic() - started < 30
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)


@pytest.mark.parametrize("code,match", [
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", r"died \(killed by signal SIGKILL\)"),
    ("import sys\nsys.stderr.write('Traceback...\\nMemoryError: out of memory\\n')\nsys.exit(3)",
     r"died \(exit status 3: MemoryError: out of memory\)"),
    ("pass", r"died \(exit status 0\)"),  # exited without a result
])
def test_a_child_that_dies_is_an_os_error_naming_the_file(monkeypatch, private_tmp, code, match):
    if "SIGKILL" in code and not hasattr(__import__("signal"), "SIGKILL"):
        pytest.skip("no SIGKILL here")
    fake_child(monkeypatch, code)
    with pytest.raises(OSError, match="tf_model.h5: the process parsing the file " + match):
        ck.read_h5(os.path.join(GOLDEN, "tf_model.h5"))


@pytest.mark.parametrize("result,arrays,error,match", [
    ({"error": "SystemExit", "message": "x"}, b"", OSError, "tf_model.h5: x"),  # not re-raised as SystemExit
    ({"error": "os.system", "message": "x"}, b"", OSError, "tf_model.h5: x"),
    ({"error": "PermissionError", "message": "no"}, b"", PermissionError, "tf_model.h5: no"),
    ({"names": ["a", "a"]}, b"", OSError, "malformed result"),
    ({"names": ["a"]}, b"", OSError, "cannot read the arrays"),
    ({"names": []}, b"junk", OSError, "cannot read the arrays"),
    ([], b"", OSError, "malformed result"),
])
def test_a_child_result_is_checked(monkeypatch, private_tmp, result, arrays, error, match):
    code = ("import os, sys\n"
            f"open(os.path.join(sys.argv[1], 'arrays.npy'), 'wb').write({arrays!r})\n"
            f"open(os.path.join(sys.argv[1], 'result.json'), 'w').write({json.dumps(result)!r})\n")
    fake_child(monkeypatch, code)
    with pytest.raises(error, match=match) as info:
        ck.read_h5(os.path.join(GOLDEN, "tf_model.h5"))
    assert type(info.value) is error


def test_a_pickled_object_array_is_never_loaded(monkeypatch, private_tmp):
    code = ("import os, sys\nimport numpy as np\n"
            "with open(os.path.join(sys.argv[1], 'arrays.npy'), 'wb') as handle:\n"
            "    np.save(handle, np.array([{'a': 1}], dtype=object), allow_pickle=True)\n"
            "open(os.path.join(sys.argv[1], 'result.json'), 'w').write('{\"names\": [\"a\"]}')\n")
    fake_child(monkeypatch, code)
    with pytest.raises(OSError, match="tf_model.h5: cannot read the arrays"):
        ck.read_h5(os.path.join(GOLDEN, "tf_model.h5"))


def test_the_child_imports_no_framework(tmp_path, private_tmp, monkeypatch):
    """The real child (the same bootstrap), with its sys.modules written out after parsing."""
    modules_file = tmp_path / "modules.json"
    code = ck._H5_CHILD_BOOTSTRAP.replace("sys.exit(_h5_child_main", "status = (_h5_child_main")
    assert code != ck._H5_CHILD_BOOTSTRAP
    code += f"json.dump(sorted(sys.modules), open({str(modules_file)!r}, 'w'))\nsys.exit(status)\n"
    monkeypatch.setattr(ck, "_h5_child_command", lambda workdir: [sys.executable, "-I", "-c", code, workdir])
    path = os.path.join(GOLDEN, "tf_model.h5")
    assert_bit_identical(ck.read_h5(path), ck._read_h5_in_process(path))
    modules = set(json.loads(modules_file.read_text()))
    assert "groupvit_core.checkpoint" in modules and "h5py" in modules
    frameworks = {name.split(".")[0] for name in modules} & {"torch", "tensorflow", "keras", "tf_keras", "jax"}
    assert not frameworks, frameworks


def test_without_sys_executable_the_file_is_parsed_in_process(monkeypatch, private_tmp):
    monkeypatch.setattr(sys, "executable", "")
    monkeypatch.setattr(ck, "_h5_child_command", lambda workdir: pytest.fail("a child was started"))
    path = os.path.join(GOLDEN, "tf_model.h5")
    assert_bit_identical(ck.read_h5(path), ck._read_h5_in_process(path))


def test_time_limit_grows_with_the_file_size():
    assert ck._h5_time_limit(0) == ck._H5_TIMEOUT_S
    assert ck._h5_time_limit(10**9) == ck._H5_TIMEOUT_S + 10 * ck._H5_TIMEOUT_PER_100MB_S


_CALLERS = {
    # python -c
    "python -c": lambda script: [sys.executable, "-c", script.read_text()],
    # a script without an `if __name__ == "__main__"` guard (multiprocessing's spawn would run it again)
    "unguarded script": lambda script: [sys.executable, str(script)],
}


@pytest.mark.parametrize("caller", list(_CALLERS))
def test_read_h5_works_from_any_caller(tmp_path, caller):
    script = tmp_path / "caller.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from groupvit_core import checkpoint as ck\n"
        f"state = ck.read_h5({os.path.join(GOLDEN, 'tf_model.h5')!r})\n"
        "print('TENSORS', len(state))\n"
    )
    run = subprocess.run(_CALLERS[caller](script), capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("TENSORS") == 1 and "TENSORS 180" in run.stdout, run.stdout


def test_console_entry_point_converts_a_tf_model_h5(tmp_path):
    """``groupvit convert`` (the console script calls groupvit_core.cli:main) reading tf_model.h5."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("config.json", "tf_model.h5"):
        shutil.copy(os.path.join(GOLDEN, name), source / name)
    code = ("import sys\n"
            f"sys.path.insert(0, {ROOT!r})\n"
            "from groupvit_core.cli import main\n"
            "sys.exit(main())\n")
    run = subprocess.run([sys.executable, "-c", code, "convert", str(source), str(tmp_path / "out"), "-q"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
