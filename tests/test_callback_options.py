"""TaggingCallback's options: one validated object, the keywords mapped onto it."""

from __future__ import annotations

import dataclasses

import pytest

from bluesky_xsml import TaggingCallback
from bluesky_xsml.documents.options import CallbackOptions
from bluesky_xsml.errors import ConfigurationError


def test_keywords_and_the_options_object_configure_the_same_callback(distinct_tagger):
    by_keyword = TaggingCallback(distinct_tagger, max_batch=7, stream_name="tags2",
                                 index_min_prob=0.25, label_cache_size=3)
    by_object = TaggingCallback(distinct_tagger, options=CallbackOptions(
        max_batch=7, stream_name="tags2", index_min_prob=0.25, label_cache_size=3))
    try:
        assert by_keyword.options == by_object.options
        for cb in (by_keyword, by_object):
            assert cb.stream_name == "tags2"
            assert cb.index_min_prob == 0.25
            assert cb.worker.max_batch == 7
    finally:
        by_keyword.close()
        by_object.close()


def test_a_keyword_overrides_the_options_object(distinct_tagger):
    cb = TaggingCallback(distinct_tagger, options=CallbackOptions(max_batch=7), max_batch=3)
    try:
        assert cb.options.max_batch == 3 and cb.worker.max_batch == 3
    finally:
        cb.close()


def test_an_unknown_keyword_is_a_type_error_that_lists_the_options(distinct_tagger):
    unknown = r"unexpected keyword arguments \['max_bacth'\].*'max_batch'"
    with pytest.raises(TypeError, match=unknown):
        TaggingCallback(distinct_tagger, max_bacth=3)


@pytest.mark.parametrize("field, value", [
    ("stream_name", ""), ("stream_name", "a.b"), ("stream_name", "a/b"),
    ("overflow", "drop"), ("isolation", "container"),
    ("max_batch", 0), ("max_batch", 2.5), ("max_batch", True),
    ("max_wait", -1), ("max_wait", float("nan")), ("stop_timeout", float("inf")),
    ("read_timeout", 0), ("read_retries", -1), ("threads", 0),
    ("index_min_prob", 1.5), ("index_min_prob", -0.1), ("index_min_prob", "high"),
    ("index_limit", -1), ("label_cache_size", -5), ("max_pending_documents", 0),
    ("image_keys", "det_image"), ("streams", [""]), ("allowed_roots", "/data"),
    ("root_map", ["/a", "/b"]), ("delivery_retry", {"max_backlog": 3}),
])
def test_a_value_that_cannot_work_is_refused_with_its_name(field, value):
    with pytest.raises(ConfigurationError, match=f"callback option {field} must be"):
        CallbackOptions(**{field: value})


def test_values_are_normalised_and_replace_checks_again():
    opts = CallbackOptions(image_keys=["det"], allowed_roots=["/data"], max_batch=4.0)
    assert opts.image_keys == ("det",) and opts.allowed_roots == ("/data",)
    assert opts.max_batch == 4 and isinstance(opts.max_batch, int)
    assert dataclasses.replace(opts, max_wait=0.2).max_wait == 0.2
    with pytest.raises(ConfigurationError, match="max_wait"):
        dataclasses.replace(opts, max_wait=-0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.max_batch = 5  # type: ignore[misc]


def test_the_callback_refuses_a_bad_value_before_it_starts_a_thread(distinct_tagger):
    import threading

    before = threading.active_count()
    with pytest.raises(ValueError, match="overflow"):
        TaggingCallback(distinct_tagger, overflow="drop")
    assert threading.active_count() == before
