"""The tag vocabulary: names, meanings and default thresholds.

The names and their order are a public contract: tag documents, checkpoints,
label arrays and queries all refer to tags by these names, and label arrays
are laid out in :data:`TAG_NAMES` order. New tags may be appended; existing
ones are never renamed or reordered.

Examples
--------
>>> from bluesky_xsml.tags import TAG_NAMES, tag_index
>>> len(TAG_NAMES)
23
>>> TAG_NAMES[tag_index("ring_oriented")]
'ring_oriented'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TAGS", "TAG_NAMES", "TAG_VOCABULARY_VERSION", "Tag", "tag_index", "validate_tag_names"]

#: Bumped when tags are appended; never decreases.
TAG_VOCABULARY_VERSION = 1


@dataclass(frozen=True)
class Tag:
    """One tag of the vocabulary.

    Parameters
    ----------
    name : str
        Identifier used in documents, labels and queries (no ``.`` or ``/``).
    group : str
        ``"scattering"``, ``"grazing"`` or ``"instrument"``.
    meaning : str
        What a frame carrying this tag shows.
    threshold : float
        Default decision threshold on the tag's probability.
    """

    name: str
    group: str
    meaning: str
    threshold: float = 0.5


TAGS: tuple[Tag, ...] = (
    # scattering features
    Tag("ring_isotropic", "scattering",
        "At least one sharp ring (radial width a few % of its radius or less) with roughly "
        "uniform intensity around the azimuth."),
    Tag("ring_oriented", "scattering",
        "A sharp ring whose intensity is concentrated in arcs (aligned/oriented sample)."),
    Tag("ring_textured", "scattering",
        "A ring made of many discrete spots or grains along the azimuth (coarse powder)."),
    Tag("many_rings", "scattering", "Five or more distinct rings."),
    Tag("higher_orders", "scattering",
        "Rings or arcs at radii in integer ratio 1:2:3... (lamellar/periodic order)."),
    Tag("halo_isotropic", "scattering",
        "A broad ring (radial width >= ~10% of its radius), uniform in azimuth (amorphous)."),
    Tag("halo_anisotropic", "scattering", "A broad ring with strong azimuthal modulation."),
    Tag("diffuse_low_q", "scattering",
        "Strong diffuse intensity decaying away from the direct beam."),
    Tag("peaks_isolated", "scattering", "A few isolated sharp spots, not on a lattice."),
    Tag("peaks_lattice", "scattering",
        "Many spots on a regular 2-D lattice (single crystal, superlattice)."),
    Tag("peaks_on_ring", "scattering",
        "A few discrete spots sharing one radius with 4- or 6-fold symmetry."),
    # grazing-incidence geometry
    Tag("horizon", "grazing",
        "The sample horizon: a horizontal edge below which scattering is strongly attenuated."),
    Tag("yoneda", "grazing", "A horizontal band of enhanced intensity just above the horizon."),
    Tag("specular_rod", "grazing", "A narrow vertical rod of intensity above the direct beam."),
    Tag("bragg_rods", "grazing",
        "Narrow vertical rods at off-centre horizontal positions (gratings, cylinders)."),
    # image and instrument
    Tag("beam_off", "instrument", "No sample scattering at all, only dark noise."),
    Tag("weak_scattering", "instrument",
        "Scattering present but only a few counts above background."),
    Tag("high_background", "instrument",
        "A flat or slowly varying background comparable to or larger than the signal."),
    Tag("beamstop_circular", "instrument", "A round shadow at the direct beam."),
    Tag("beamstop_linear", "instrument",
        "A rod-shaped beamstop shadow running from the beam position to the edge."),
    Tag("detector_gaps", "instrument",
        "Dead rows/columns between detector modules (0, sentinel values or NaN)."),
    Tag("saturation", "instrument",
        "A region of pixels clipped at the detector's maximum count."),
    Tag("streaks", "instrument",
        "Thin straight streaks through the beam position (parasitic slit scattering)."),
)

#: Tag names in their fixed order (the column order of every label array).
TAG_NAMES: tuple[str, ...] = tuple(t.name for t in TAGS)

_INDEX = {name: i for i, name in enumerate(TAG_NAMES)}


def tag_index(name: str) -> int:
    """Return the column of tag ``name`` in label and probability arrays.

    Raises
    ------
    KeyError
        If ``name`` is not a tag; the message lists the valid names.
    """
    try:
        return _INDEX[name]
    except KeyError:
        raise KeyError(
            f"unknown tag {name!r}; valid tags are: {', '.join(TAG_NAMES)}"
        ) from None


def validate_tag_names(names) -> tuple[str, ...]:
    """Check that ``names`` are usable as document data keys and unique.

    >>> validate_tag_names(["a", "b"])
    ('a', 'b')
    """
    names = tuple(str(n) for n in names)
    bad = [n for n in names if not n or "." in n or "/" in n]
    if bad:
        raise ValueError(f"tag names may not be empty or contain '.' or '/': {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"tag names must be unique, got {names}")
    return names


def _markdown() -> str:  # pragma: no cover - documentation helper
    groups = (("scattering", "Scattering features"), ("grazing", "Grazing-incidence geometry"),
              ("instrument", "Image and instrument"))
    lines = ["# The tag vocabulary", "",
             "Names and order are a public contract (`bluesky_xsml.tags.TAG_NAMES`): label arrays, "
             "tag", "documents and checkpoints use this order; new tags are appended, none is "
             "renamed. This page is", "generated from `bluesky_xsml/tags.py` "
             "(`python -m bluesky_xsml.tags`).", ""]
    for group, title in groups:
        lines += [f"## {title}", "", "| tag | meaning | default threshold |", "|---|---|---|"]
        lines += [f"| `{t.name}` | {t.meaning} | {t.threshold} |" for t in TAGS if t.group == group]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(_markdown())
