"""The application layer: everything from a :class:`~pyrolora.runs.config.RunConfig` to a run folder and back.

- :mod:`~pyrolora.runs.config`: the run configuration (TOML / JSON, base plus overlays).
- :mod:`~pyrolora.runs.folder`: the run-folder format: every file name, the manifest, ``config.json``.
- :mod:`~pyrolora.runs.build`: build backbone, adapters, model and guide from a config; train, evaluate, save, load.
- :mod:`~pyrolora.runs.methods`: ``METHODS[name]``, one module per method behind one protocol.
- :mod:`~pyrolora.runs.runner`: train any method and evaluate it (``pyrolora train``, the benchmarks).
- :mod:`~pyrolora.runs.trained`: load the run folder of any method (``pyrolora evaluate``).
- :mod:`~pyrolora.runs.report` (uncertainty report), :mod:`~pyrolora.runs.diagnose` (``pyrolora diagnose``),
  :mod:`~pyrolora.runs.export` (``pyrolora export`` / ``merge``), :mod:`~pyrolora.runs.tracking` (training
  logs), :mod:`~pyrolora.runs.demo`, :mod:`~pyrolora.runs.device` (``--device``).

The library rooms (adapters, models, inference, data, evaluation, diagnostics) never import this package.
"""
