"""Fixtures for every test of the repository: the tests in tests/ and the doctests.

Here, not in tests/conftest.py, so that it also covers the doctests of
``bluesky_xsml`` (``--doctest-modules``), run alone or first on an xdist worker.
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


@pytest.fixture(scope="session", autouse=True)
def writes_stay_in_basetemp(tmp_path_factory):
    """Point every cache and settings folder the suite could write at pytest's basetemp.

    Also Hypothesis's example database, which it would keep in ``./.hypothesis``
    (a failing example is still printed with the failure). Yields the folder.
    """
    root = tmp_path_factory.mktemp("home")
    before = {k: os.environ.get(k) for k in CACHE_ENV}
    os.environ.update({k: str(root / v) for k, v in CACHE_ENV.items()})
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        set_hypothesis_home_dir = None
    else:   # the default database is found again at each use, so this reaches every test
        set_hypothesis_home_dir(root / "hypothesis")
    try:
        yield root
    finally:
        if set_hypothesis_home_dir is not None:
            set_hypothesis_home_dir(None)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
