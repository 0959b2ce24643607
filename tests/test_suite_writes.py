"""The test suite writes only under pytest's basetemp, never into the home directory.

The root ``conftest.py`` points the caches at a folder of the basetemp (before collection,
in ``pytest_configure``); these tests fail if it stops doing so, or if the code stops reading
the setting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bluesky_xsml.training.data import default_cache_dir


def _under(path, root) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XSML_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "own"
    monkeypatch.delenv("XSML_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "bluesky-xsml"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")    # not absolute: ignored (XDG)
    assert default_cache_dir() == Path.home() / ".cache" / "bluesky-xsml"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "bluesky-xsml"


def test_the_suites_caches_resolve_under_basetemp(tmp_path_factory, writes_stay_in_basetemp):
    base = tmp_path_factory.getbasetemp()
    assert _under(writes_stay_in_basetemp, base)
    assert _under(default_cache_dir(), base), default_cache_dir()
    assert not _under(default_cache_dir(), Path.home())
    from hypothesis.configuration import storage_directory  # also what collection writes

    assert _under(storage_directory("constants", intent_to_write=False).path, base)
    # a subprocess (the CLI, examples, workers) inherits the same places
    code = ("import json, matplotlib; from hypothesis.configuration import storage_directory; "
            "from bluesky_xsml.training.data import default_cache_dir; "
            "print(json.dumps([str(default_cache_dir()), matplotlib.get_cachedir(), "
            "str(storage_directory('examples', intent_to_write=False).path)]))")
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120)
    for path in json.loads(res.stdout.strip().splitlines()[-1]):
        assert _under(path, base) and not _under(path, Path.home() / ".cache"), path


def test_a_dataset_built_without_cache_dir_lands_under_basetemp(tmp_path_factory):
    """What the live fine-tuner's synthetic replay and `xsml evaluate` do by default."""
    from bluesky_xsml.training.data import load_arrays

    arrays = load_arrays("synth:seed=11,n=2,sizes=64", progress=False)
    written = [Path(a.filename) for a in (arrays.inputs, arrays.features)
               if getattr(a, "filename", None)]
    assert written, "the inputs are not memory-mapped from a cache file"
    for path in written:
        assert _under(path, tmp_path_factory.getbasetemp()), path
