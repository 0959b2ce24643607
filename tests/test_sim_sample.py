"""The simulated combinatorial sample and the detectors that look at it.

Real ophyd simulated motors, a real RunEngine, real HDF5 files in tmp_path;
every document is schema-validated.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from bluesky.plans import grid_scan, list_scan
from ophyd.sim import SynAxis
from ophyd_async.core import init_devices

from bluesky_xsml.errors import ConfigurationError
from bluesky_xsml.sim import (
    CombinatorialSample,
    SampleStageDetector,
    hdf5_stage_detector,
    make_beamline,
    stream_stage_detector,
)
from bluesky_xsml.sim.detectors import DATA_PATH
from bluesky_xsml.sim.sample import REGIONS, position_frame_source
from tests.conftest import validate_all

# one point well inside each region, and the tag that region is built to show
INSIDE = {
    "amorphous": ((1.0, 2.0), "halo_isotropic"),
    "mixed": ((3.5, 5.0), None),
    "powder": ((5.0, 2.0), "ring_isotropic"),
    "textured": ((5.0, 8.0), "ring_textured"),
    "oriented": ((8.0, 2.0), "ring_oriented"),
    "crystal": ((8.0, 7.0), "peaks_lattice"),
    "blank": ((9.6, 5.0), "beam_off"),
}
CHARACTERISTIC = {tag for _, tag in INSIDE.values() if tag}


@pytest.fixture(scope="module")
def sample():
    return CombinatorialSample(seed=3, size=96)


def test_every_region_shows_its_structure_and_only_it(sample):
    assert set(INSIDE) == set(REGIONS)
    for region, ((x, y), tag) in INSIDE.items():
        assert sample.region_at(x, y) == region
        tags = set(sample.tags_at(x, y))
        if region == "mixed":   # coexistence: both phases are seen
            assert {"halo_isotropic", "ring_isotropic"} <= tags
            continue
        # the region's own tag, and no other region's characteristic tag
        assert tag in tags, (region, tags)
        assert not (tags & CHARACTERISTIC) - {tag}, (region, tags)
    assert sample.tags_at(9.6, 5.0) == ["beam_off", "detector_gaps"]
    # off the film anywhere is blank
    for x, y in [(-0.5, 5.0), (5.0, -0.1), (5.0, 10.5)]:
        assert sample.region_at(x, y) == "blank"


def test_amorphous_boundary_is_wavy_and_tags_change_across_it(sample):
    # the crossing point along x depends on y
    def crossing(y):
        xs = np.linspace(2.0, 5.0, 301)
        return xs[np.argmax([sample.crystalline_fraction(x, y) > 0.5 for x in xs])]

    assert crossing(2.5) - crossing(7.5) > 0.8
    assert "ring_isotropic" not in sample.tags_at(crossing(2.5) - 0.5, 2.5)
    assert "ring_isotropic" in sample.tags_at(crossing(2.5) + 0.5, 2.5)


def test_frames_are_reproducible_and_depend_on_position_and_shot(sample):
    a = sample.frame_at(5.0, 2.0, shot=0)
    assert a.dtype == np.int32 and max(a.shape) == 96
    assert np.array_equal(a, CombinatorialSample(seed=3, size=96).frame_at(5.0, 2.0, shot=0))
    assert not np.array_equal(a, sample.frame_at(5.0, 2.0, shot=1))      # new noise
    assert not np.array_equal(a, CombinatorialSample(seed=4, size=96).frame_at(5.0, 2.0))
    dark = sample.frame_at(9.6, 5.0)
    bright = sample.frame_at(1.0, 2.0)
    seen = bright >= 0                                                    # gaps are -1
    assert dark[dark >= 0].max() <= 2 < bright[seen].max()
    # thicker film at larger y: more counts in the same phase
    assert sample.frame_at(1.0, 9.0)[seen].sum() > bright[seen].sum()


def test_bad_input_gets_clear_errors(sample):
    with pytest.raises(ConfigurationError, match="size >= 64"):
        CombinatorialSample(size=32)
    with pytest.raises(ConfigurationError, match="width and height must be > 0"):
        CombinatorialSample(width=0)
    with pytest.raises(ConfigurationError, match="unknown detector 'pilatus_9z'"):
        CombinatorialSample(detector="pilatus_9z")
    with pytest.raises(ValueError, match="must be finite"):
        sample.frame_at(float("nan"), 1.0)
    with pytest.raises(TypeError, match="must have a 'position'"):
        position_frame_source(sample, "sample_x")


def test_layout_scales_with_the_film_size():
    big = CombinatorialSample(size=64, width=50.0, height=20.0)
    assert big.region_at(25.0, 4.0) == "powder" and big.region_at(47.0, 10.0) == "blank"


def test_inline_detector_frames_follow_the_motors(RE, sample):
    """Each event's frame is the sample at the motor positions of that event."""
    x, y = SynAxis(name="x"), SynAxis(name="y")
    det = SampleStageDetector("saxs", x, y, sample)
    docs = []
    RE(grid_scan([det], y, 2.0, 8.0, 2, x, 1.0, 9.6, 3), lambda n, d: docs.append((n, d)))
    validate_all(docs)
    events = [d for n, d in docs if n == "event"]
    assert len(events) == 6
    regions = []
    for i, ev in enumerate(events):
        px, py = ev["data"]["x"], ev["data"]["y"]
        regions.append(sample.region_at(px, py))
        assert np.array_equal(ev["data"]["saxs_image"], sample.frame_at(px, py, shot=i))
    assert regions == ["amorphous", "powder", "blank", "amorphous", "textured", "blank"]
    desc = next(d for n, d in docs if n == "descriptor")
    assert desc["data_keys"]["saxs_image"]["shape"] == list(sample.frame_at(0, 0).shape)


def test_hdf5_detector_first_frame_is_taken_after_the_move(RE, sample, tmp_path):
    x = SynAxis(name="x")
    x.set(9.6)          # parked on the blank edge before the scan
    det = hdf5_stage_detector("waxs", x, 5.0, sample, root_dir=tmp_path)
    docs = []
    RE(list_scan([det], x, [1.0, 8.0]), lambda n, d: docs.append((n, d)))
    validate_all(docs)
    resource = next(d for n, d in docs if n == "resource")
    assert resource["spec"] == "AD_HDF5"
    with h5py.File(tmp_path / resource["resource_path"], "r") as f:
        frames = f[DATA_PATH][()]
    assert len(frames) == 2
    # stage drew (and dropped) exposure 0 at x = 9.6; the scan's frames are exposures 1, 2
    assert np.array_equal(frames[0], sample.frame_at(1.0, 5.0, shot=1))
    assert np.array_equal(frames[1], sample.frame_at(8.0, 5.0, shot=2))
    assert det.sample is sample


def test_stream_detector_writes_the_sample_where_the_beam_is(RE, sample, tmp_path):
    x = SynAxis(name="x")
    with init_devices():
        det = stream_stage_detector("gisaxs", x, 2.0, sample, root_dir=tmp_path)
    docs = []
    RE(list_scan([det], x, [9.6, 5.0]), lambda n, d: docs.append((n, d)))
    validate_all(docs)
    sres = next(d for n, d in docs if n == "stream_resource")
    from urllib.parse import urlparse

    with h5py.File(urlparse(sres["uri"]).path, "r") as f:
        frames = f[DATA_PATH][()]
    assert len(frames) == 2
    assert frames[0][frames[0] >= 0].max() <= 2                 # blank edge: dark
    assert sample.region_at(5.0, 2.0) == "powder"
    assert frames[1][frames[1] >= 0].max() > 50                 # rings


def test_make_beamline_wires_motors_to_the_detector(RE):
    bl = make_beamline(size=64, seed=1)
    docs = []
    RE(list_scan([bl.det], bl.sample_x, [1.0, 9.8], bl.sample_y, [5.0, 5.0]),
       lambda n, d: docs.append((n, d)))
    frames = [d["data"]["saxs_image"] for n, d in docs if n == "event"]
    assert np.array_equal(frames[0], bl.sample.frame_at(1.0, 5.0, shot=0))
    assert np.array_equal(frames[1], bl.sample.frame_at(9.8, 5.0, shot=1))
    assert bl.det.frame_source.last_position == (9.8, 5.0)
