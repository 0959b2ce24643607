"""The steering service: a FastAPI app over a live :class:`~bluesky_xsml.TaggingCallback`.

Nothing heavy is imported here; use :func:`bluesky_xsml.api.app.create_app` or
:func:`bluesky_xsml.api.serve.serve` (``TaggingCallback.serve``).
"""
