"""Scale-out: tagging workers on the document bus, and re-tagging stored runs on Dask.

* :mod:`.transport` -- where workers read documents from (0MQ; the seam for Kafka).
* :mod:`.partition` -- which worker tags which run (a stable hash of the start uid).
* :mod:`.gaps` -- what a lossy bus dropped, and reading it back from the catalog.
* :mod:`.worker` -- ``xsml worker``: tag the runs of one partition from the bus.
* :mod:`.retag` -- ``xsml retag``: tag stored runs with a new model on a Dask cluster.

Nothing heavy is imported here; see ``docs/scale-out.md``.
"""
