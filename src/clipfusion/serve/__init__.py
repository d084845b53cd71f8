"""``clipfusion serve``: fitted detectors behind an HTTP API, and the inspector page.

- :mod:`clipfusion.serve.app`: the FastAPI application (``/v1`` API, ``/healthz``, ``/readyz``, the page at
  ``/``, the API's own page at ``/docs``), uploads read and checked as the CLI checks files;
- :mod:`clipfusion.serve.pool`: the detectors of one server, loaded in the background;
- :mod:`clipfusion.serve.batching`: one worker thread per detector, micro-batching, the bounded door;
- :mod:`clipfusion.serve.encoding`: maps (base64 float32) and overlay PNGs;
- :mod:`clipfusion.serve.server`: uvicorn with a graceful stop;
- ``static/``: the page (plain HTML, CSS and JavaScript, no library, nothing fetched from elsewhere).

Importing this package imports no web framework: the server packages are the ``serve`` extra.
"""
