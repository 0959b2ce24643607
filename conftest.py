"""What every test session of the repository needs: the tests in tests/ and the doctests.

The suite writes only under pytest's basetemp. Here, not in tests/conftest.py,
so that it also covers the doctests of ``bluesky_xsml`` (``--doctest-modules``),
run alone or first on an xdist worker.
"""

from __future__ import annotations

import os

import pytest

#: Environment variables that send what code would write into the home directory (or
#: the current directory) elsewhere: the training-data cache (``xsml train``/``evaluate``,
#: the live fine-tuner's synthetic replay, benchmarks), matplotlib's font cache,
#: IPython's profile folder, and what follows the XDG base directories (tiled's client,
#: dconf, ...). Subprocesses inherit them. Numba's cache stays beside the source.
CACHE_ENV = {"XSML_CACHE": "xsml-cache", "XDG_CACHE_HOME": "cache",
             "XDG_CONFIG_HOME": "config", "XDG_DATA_HOME": "data", "XDG_STATE_HOME": "state",
             "MPLCONFIGDIR": "matplotlib", "IPYTHONDIR": "ipython",
             "HYPOTHESIS_STORAGE_DIRECTORY": "hypothesis"}

_HOME = pytest.StashKey[tuple]()


@pytest.hookimpl(trylast=True)   # after pytest's own tmp_path plugin has configured
def pytest_configure(config):
    """Point every cache and settings folder the suite could write at pytest's basetemp.

    Done here, before collection, because collection already writes: Hypothesis's
    plugin stores the constants of test modules in its storage directory
    (``./.hypothesis`` by default), which also holds its example database.
    """
    # pytest keeps its basetemp factory here (what the tmp_path_factory fixture returns)
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:   # tmp_path disabled (-p no:tmpdir): leave the environment alone
        return
    root = factory.mktemp("home")
    before = {k: os.environ.get(k) for k in CACHE_ENV}
    os.environ.update({k: str(root / v) for k, v in CACHE_ENV.items()})
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        pass
    else:   # HYPOTHESIS_STORAGE_DIRECTORY is read once, maybe before this: set it here too
        set_hypothesis_home_dir(root / "hypothesis")
    config.stash[_HOME] = (root, before)


def pytest_unconfigure(config):
    root, before = config.stash.get(_HOME, (None, {}))
    if root is None:
        return
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        pass
    else:
        set_hypothesis_home_dir(None)
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def writes_stay_in_basetemp(pytestconfig):
    """The folder of the basetemp that the caches and settings folders point into."""
    if _HOME not in pytestconfig.stash:
        pytest.fail("conftest.py did not redirect the caches (is the tmp_path plugin off?)")
    return pytestconfig.stash[_HOME][0]
