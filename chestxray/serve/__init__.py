"""The app's service, for every front end (the Gradio page in ``app.py``, the plain HTTP API in :mod:`.rest`).

Nothing here imports gradio, and importing the package imports nothing at all (no torch, no web
framework): each front end takes the modules it needs.

- :mod:`.runtime`: the process's tuning (malloc arenas, heap trimming, torch threads) and the few work
  threads every handler runs on;
- :mod:`.limits`: the one limit on concurrent model calls shared by all front ends, its bounded queue,
  the upload limits;
- :mod:`.encode`: fast PNG, JPEG overlays, gallery thumbnails;
- :mod:`.files`: output files handed to a front end by path;
- :mod:`.sessions`: what a session keeps of an analysis (no model involved to redraw it);
- :mod:`.text`: the captions, tables, card and disclaimer a front end shows;
- :mod:`.service`, :mod:`.viewer`: the handlers, returning plain data and raising :class:`.service.ServiceError`
  (one line) for anything a user should read;
- :mod:`.rest`: ``/v1/predict``, ``/v1/models``, ``/healthz`` (FastAPI), served beside the Gradio page.
"""
