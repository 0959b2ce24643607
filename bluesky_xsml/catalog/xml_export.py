"""Export a run's tags in the XML result format of CFN's analysis tools.

CFN's SciAnalysis writes one XML file per detector image: a ``<DataFile
name=...>`` root holding one ``<protocol name=... end_timestamp=...>`` element
per analysis, each with ``<result name=... value=...>`` elements; its reader
(``SciAnalysis.Result.ResultsXML``) takes the protocol with the latest
``end_timestamp`` and reads each result's ``value`` as a float. The tags of a
frame are exported the same way, as the protocol ``tag_generated``::

    <DataFile name="a1b2c3d4_primary_img_00003">
      <protocol name="tag_generated" start_timestamp="..." end_timestamp="..."
                runtime="0.0" save_timestamp="..." model="43964cf25583" run_uid="..."
                scan_id="7" stream="primary" seq_num="3" key="img" frame_index="0"
                tags="ring_isotropic,beam_off" skip_reason="">
        <result name="ring_isotropic" value="0.93" threshold="0.5"/>
        ...
      </protocol>
    </DataFile>

One result per tag, in the model's tag order; a skipped frame has
``value="nan"`` for every tag and a non-empty ``skip_reason``.

Examples
--------
>>> xml = frame_xml("r1_primary_img_00001", {"ring_isotropic": 0.9, "beam_off": 0.1},
...                 attributes={"model": "abc"}, thresholds={"ring_isotropic": 0.5})
>>> print(xml.decode().splitlines()[1])
<DataFile name="r1_primary_img_00001">
>>> parse_frame_xml(xml)["ring_isotropic"]
0.9
"""

from __future__ import annotations

import math
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["PROTOCOL", "export_run_xml", "frame_xml", "parse_frame_xml", "run_to_xml"]

#: The protocol name CFN's tools look up for generated tags.
PROTOCOL = "tag_generated"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(float(value))
    return str(value)


def frame_xml(name: str, probabilities: Mapping[str, float], *,
              attributes: Mapping[str, Any] | None = None,
              thresholds: Mapping[str, float] | None = None,
              end_timestamp: float | None = None) -> bytes:
    """One frame's tags as a CFN ``<DataFile>`` XML document (UTF-8 bytes).

    Parameters
    ----------
    name : str
        The ``DataFile`` name (CFN uses the image file's base name).
    probabilities : mapping
        Tag name -> probability (NaN for a skipped frame), in output order.
    attributes : mapping, optional
        Extra ``protocol`` attributes (model, run uid, seq_num...), as strings.
    thresholds : mapping, optional
        Per-tag thresholds, written as a ``threshold`` attribute of each result.
    end_timestamp : float, optional
        When the tags were made (default now); CFN's reader picks the protocol
        with the latest one.
    """
    end = time.time() if end_timestamp is None else float(end_timestamp)
    root = ET.Element("DataFile", name=str(name))
    attrs = {"name": PROTOCOL, "start_timestamp": _fmt(end), "end_timestamp": _fmt(end),
             "runtime": "0.0", "save_timestamp": _fmt(time.time())}
    for key, value in (attributes or {}).items():
        if key in attrs:
            raise ValueError(f"protocol attribute {key!r} is set by the exporter")
        attrs[str(key)] = _fmt(value)
    protocol = ET.SubElement(root, "protocol", attrs)
    for tag, p in probabilities.items():
        result = {"name": str(tag), "value": _fmt(float(p))}
        if thresholds and tag in thresholds:
            result["threshold"] = _fmt(float(thresholds[tag]))
        ET.SubElement(protocol, "result", result)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def parse_frame_xml(data: bytes | str, *, protocol: str = PROTOCOL) -> dict[str, Any]:
    """Read results back the way CFN's reader does (latest protocol, float values)."""
    root = ET.fromstring(data)
    candidates = [p for p in root if p.tag == "protocol" and p.get("name") == protocol]
    if not candidates:
        raise ValueError(f"no <protocol name={protocol!r}> in the document")
    latest = max(candidates, key=lambda p: float(p.get("end_timestamp", "-inf")))
    out: dict[str, Any] = {}
    for result in latest:
        if result.tag == "result" and result.get("value") is not None:
            try:
                out[result.get("name")] = float(result.get("value"))
            except ValueError:
                out[result.get("name")] = result.get("value")
    return out


def run_to_xml(run, *, stream: str | None = None) -> dict[str, bytes]:
    """Every frame of a run's tag stream as CFN XML documents.

    Parameters
    ----------
    run : BlueskyRun
        A stored run with a tag stream.
    stream : str, optional
        The tag stream (default: the run's current one, ``stop.xsml_stream``).

    Returns
    -------
    dict
        File name (``<uid8>_<stream>_<key>_<seq_num:05d>[_<frame_index>].xml``)
        -> document bytes, in tag-stream order.

    Raises
    ------
    KeyError
        If the run has no such tag stream; the message lists its streams.
    """
    from .query import tag_stream_node

    md = run.metadata
    start = md.get("start") or {}
    name, node = tag_stream_node(run, stream)
    data_keys = node.metadata.get("data_keys") or {}
    tags = [k for k, dk in data_keys.items() if dk.get("units") == "probability"]
    thresholds = {k: data_keys[k]["threshold"] for k in tags if "threshold" in data_keys[k]}
    base = node.base if hasattr(node, "base") else node
    df = base["internal"].read()
    uid = str(start.get("uid", ""))
    out: dict[str, bytes] = {}
    for _, row in df.iterrows():
        seq, idx = int(row["source_seq_num"]), int(row["frame_index"])
        fname = f"{uid[:8]}_{row['source_stream']}_{row['source_key']}_{seq:05d}"
        fname += f"_{idx}" if idx else ""
        attributes = {"model": row.get("checkpoint", ""), "run_uid": uid,
                      "scan_id": start.get("scan_id", ""), "stream": row["source_stream"],
                      "seq_num": seq, "key": row["source_key"], "frame_index": idx,
                      "tags": row.get("tags", ""), "skip_reason": row.get("skip_reason", ""),
                      "tag_stream": name}
        sample = start.get("sample")
        if isinstance(sample, (str, int, float)):
            attributes["sample"] = sample
        out[fname + ".xml"] = frame_xml(
            fname, {t: float(row[t]) for t in tags}, attributes=attributes,
            thresholds=thresholds, end_timestamp=float(row["time"]))
    return out


def export_run_xml(run, directory: str | os.PathLike, *, stream: str | None = None,
                   overwrite: bool = False) -> list[Path]:
    """Write :func:`run_to_xml` documents into ``directory`` (created if missing).

    Existing files are left alone unless ``overwrite`` (a ``FileExistsError``
    names the first one).
    """
    docs = run_to_xml(run, stream=stream)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / name for name in docs]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    for path, data in zip(paths, docs.values(), strict=True):
        tmp = path.with_suffix(".xml.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return paths
