"""Every rule of the option objects, with the exact words an operator reads.

``bluesky_xsml.option_checks`` (shared by :class:`CallbackOptions` and the fine-tuning
config) and :class:`~bluesky_xsml.documents.options.CallbackOptions` itself: the documented
defaults, each limit on both sides, the normalised values, and the message that names the
option. No callback is built (``tests/test_callback_options.py`` does that), so the file runs
in a second.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from bluesky_xsml.documents.options import CallbackOptions
from bluesky_xsml.documents.outbox import RetryPolicy
from bluesky_xsml.errors import ConfigurationError
from bluesky_xsml.option_checks import bad, integer, number, with_keywords


def refused(message: str):
    return pytest.raises(ConfigurationError, match=f"^{re.escape(message)}$")


# ------------------------------------------------------------------ option_checks
def test_bad_words_the_error():
    err = bad("fine-tuning", "lr", "> 0", "x")
    assert isinstance(err, ConfigurationError) and isinstance(err, ValueError)
    assert str(err) == "fine-tuning option lr must be > 0, got 'x'"


def test_integer_takes_whole_numbers_from_low_up():
    assert integer("w", "n", 4.0, 1) == 4 and type(integer("w", "n", 4.0, 1)) is int
    assert integer("w", "n", np.int64(3), 3) == 3
    assert integer("w", "n", "7", 0) == 7
    assert integer("w", "n", 0, 0) == 0
    for value in (2, 2.5, True, None, "x", float("inf"), float("nan"), [3]):
        with refused(f"w option n must be an integer >= 3, got {value!r}"):
            integer("w", "n", value, 3)


def test_number_is_finite_and_within_its_bounds():
    assert number("w", "x", "0.5") == 0.5 and type(number("w", "x", 1)) is float
    for value in (float("nan"), float("inf"), -float("inf"), True, None, "x"):
        with refused(f"w option x must be a finite number, got {value!r}"):
            number("w", "x", value)
    assert number("w", "x", 0.0, 0.0) == 0.0                    # closed: the bound itself
    assert number("w", "x", 1.0, None, 1.0) == 1.0
    with refused("w option x must be >= 0.0, got -0.1"):
        number("w", "x", -0.1, 0.0)
    with refused("w option x must be > 0.0, got 0"):
        number("w", "x", 0, 0.0, open_low=True)
    assert number("w", "x", 1e-9, 0.0, open_low=True) == 1e-9
    with refused("w option x must be <= 1.0, got 1.5"):
        number("w", "x", 1.5, None, 1.0)
    with refused("w option x must be < 1.0, got 1.0"):
        number("w", "x", 1.0, 0.0, 1.0, open_high=True)
    assert number("w", "x", 0.999, 0.0, 1.0, open_high=True) == 0.999
    assert number("w", "x", -5.0, None, 1.0, open_low=True) == -5.0   # no low bound
    assert number("w", "x", 5.0, 1.0, None, open_high=True) == 5.0     # no high bound


@dataclasses.dataclass(frozen=True)
class Small:
    a: int = 1
    b: int = 2

    def __post_init__(self):
        if self.a < 0:
            raise ConfigurationError("a < 0")


def test_with_keywords_applies_keywords_over_a_base():
    assert with_keywords(Small, None, {}, "f") == Small()
    base = Small(a=5)
    assert with_keywords(Small, base, {}, "f") is base
    assert with_keywords(Small, base, {"b": 7}, "f") == Small(a=5, b=7)
    with pytest.raises(ConfigurationError, match="a < 0"):         # checked again
        with_keywords(Small, base, {"a": -1}, "f")
    with pytest.raises(TypeError) as info:
        with_keywords(Small, None, {"z": 1, "c": 2, "a": 3}, "finetune")
    assert str(info.value) == ("finetune got unexpected keyword arguments ['c', 'z']; its "
                               "options are ['a', 'b']")
    with refused("config must be a Small, got dict"):
        with_keywords(Small, {"a": 1}, {}, "f")
    with refused("options must be a Small, got int"):
        with_keywords(Small, 3, {}, "f", "options")


# ------------------------------------------------------------------ CallbackOptions
def test_documented_defaults():
    o = CallbackOptions()
    assert dataclasses.asdict(o) == {
        "stream_name": "xsml_tags", "image_keys": None, "streams": None, "max_batch": 32,
        "max_wait": 0.05, "max_pending_bytes": 2 * 1024**3, "overflow": "skip",
        "hand_off_timeout": 0.05, "stop_timeout": 300.0, "max_pending_documents": 10_000,
        "max_block": 0.5, "handler_registry": None, "root_map": None, "read_retries": 5,
        "read_retry_delay": 0.1, "allowed_roots": None, "read_timeout": 30.0, "threads": None,
        "validate_pages": False, "delivery_retry": None, "label_cache_size": 2000,
        "index_min_prob": 0.5, "index_limit": 1000, "beam_center": None, "readout": None,
        "isolation": "thread", "process_options": None}


@pytest.mark.parametrize("name", ["", "a.b", "a/b", 3, None])
def test_stream_name_must_be_a_plain_name(name):
    with refused(f"callback option stream_name must be a non-empty name without '.' or '/', "
                 f"got {name!r}"):
        CallbackOptions(stream_name=name)


def test_choices():
    assert CallbackOptions(overflow="wait").overflow == "wait"
    assert CallbackOptions(isolation="process").isolation == "process"
    with refused("callback option overflow must be 'skip' or 'wait', got 'drop'"):
        CallbackOptions(overflow="drop")
    with refused("callback option isolation must be 'thread' or 'process', got 'x'"):
        CallbackOptions(isolation="x")


def test_index_min_prob_is_a_probability():
    for ok in (0, 0.0, 1, "0.25"):
        assert CallbackOptions(index_min_prob=ok).index_min_prob == float(ok)
    assert type(CallbackOptions(index_min_prob=1).index_min_prob) is float
    for no in (-0.01, 1.01, True, "high", None, float("nan")):
        with refused(f"callback option index_min_prob must be in [0, 1], got {no!r}"):
            CallbackOptions(index_min_prob=no)


def test_objects_that_must_be_of_a_kind():
    policy = RetryPolicy()
    assert CallbackOptions(delivery_retry=policy).delivery_retry is policy
    with refused("callback option delivery_retry must be a RetryPolicy or None, got 'dict'"):
        CallbackOptions(delivery_retry={"max_backlog": 3})
    for mapping in ("handler_registry", "root_map"):
        assert getattr(CallbackOptions(**{mapping: {"a": "b"}}), mapping) == {"a": "b"}
        with refused(f"callback option {mapping} must be a mapping or None, got 'list'"):
            CallbackOptions(**{mapping: ["/a", "/b"]})


def test_name_lists():
    o = CallbackOptions(image_keys=["det", "cam"], streams=["primary"],
                        allowed_roots=iter(["/data", "/scratch"]))
    assert (o.image_keys, o.streams, o.allowed_roots) == (("det", "cam"), ("primary",),
                                                           ("/data", "/scratch"))
    assert CallbackOptions(allowed_roots=[]).allowed_roots == ()
    for field in ("image_keys", "streams"):
        for value in ("det", 3):
            with refused(f"callback option {field} must be a list of names or None, "
                         f"got {value!r}"):
                CallbackOptions(**{field: value})
        for value in ([""], ["a", 3]):
            with refused(f"callback option {field} must be a list of non-empty strings, "
                         f"got {value!r}"):
                CallbackOptions(**{field: value})
    for value in ("/data", 3):
        with refused(f"callback option allowed_roots must be a list of directories or None, "
                     f"got {value!r}"):
            CallbackOptions(allowed_roots=value)


@pytest.mark.parametrize(("field", "low"), [
    ("max_batch", 1), ("max_pending_bytes", 0), ("max_pending_documents", 1),
    ("read_retries", 0), ("threads", 1), ("label_cache_size", 0), ("index_limit", 0)])
def test_integer_options_and_their_lowest_value(field, low):
    o = CallbackOptions(**{field: float(low)})
    assert getattr(o, field) == low and type(getattr(o, field)) is int
    with refused(f"callback option {field} must be an integer >= {low}, got {low - 1}"):
        CallbackOptions(**{field: low - 1})


@pytest.mark.parametrize("field", ["max_wait", "hand_off_timeout", "stop_timeout", "max_block",
                                   "read_retry_delay"])
def test_seconds_options(field):
    assert getattr(CallbackOptions(**{field: 0}), field) == 0.0
    o = CallbackOptions(**{field: "1.5"})
    assert getattr(o, field) == 1.5 and type(getattr(o, field)) is float
    for value in (-0.001, float("nan"), float("inf"), True, None, "soon"):
        with refused(f"callback option {field} must be a finite number of seconds >= 0, "
                     f"got {value!r}"):
            CallbackOptions(**{field: value})


def test_read_timeout_may_be_none_but_not_zero():
    assert CallbackOptions(read_timeout=None).read_timeout is None
    assert CallbackOptions(read_timeout=0.001).read_timeout == 0.001
    o = CallbackOptions(read_timeout="2")                 # stored as the number it checked
    assert o.read_timeout == 2.0 and type(o.read_timeout) is float
    for value in (0, 0.0, -1, math.inf):
        with refused("callback option read_timeout must be a finite number of seconds > 0 or "
                     f"None, got {value!r}"):
            CallbackOptions(read_timeout=value)


def test_threads_may_be_none_and_validate_pages_is_a_flag():
    assert CallbackOptions(threads=None).threads is None
    assert CallbackOptions(validate_pages=1).validate_pages is True
    assert CallbackOptions(validate_pages=[]).validate_pages is False


def test_resolve_applies_keywords_and_names_the_callback():
    base = CallbackOptions(max_batch=7)
    assert CallbackOptions.resolve(None, {}) == CallbackOptions()
    assert CallbackOptions.resolve(base, {}) is base
    assert CallbackOptions.resolve(base, {"overflow": "wait"}) == CallbackOptions(
        max_batch=7, overflow="wait")
    with pytest.raises(TypeError, match=r"^TaggingCallback got unexpected keyword arguments "
                                        r"\['max_bacth'\]; its options are \['stream_name', "):
        CallbackOptions.resolve(None, {"max_bacth": 3})
    with refused("options must be a CallbackOptions, got dict"):
        CallbackOptions.resolve({"max_batch": 3}, {})
