"""Learn the line: an anomaly map from a memory of normal patches of the same line, without labels.

- :mod:`~workers.memory.params` ``MemoryParams``: the memory's options (from ``settings.memory``).
- :mod:`~workers.memory.features` patch features of the SAM encoder outputs, grid -> frame maps, image score.
- :mod:`~workers.memory.coreset` greedy k-center selection, a memory built frame by frame, its bound.
- :mod:`~workers.memory.search` nearest-neighbour search over the memory (``memory.search``).
- :mod:`~workers.memory.calibration` thresholds from normal frames (leave-one-out maps, GEV false-alarm tail).
- :mod:`~workers.memory.label_free` a clean memory from unlabeled frames, most of which may be defective.
- :mod:`~workers.memory.store` the line's memory in Redis (float16 bytes and a JSON header).
- :mod:`~workers.memory.folder` known-good images of a folder and their embeddings.
- :mod:`~workers.memory.mapper` ``MemoryMapper`` (the anomaly mapper) and ``load_line_memory`` (a worker's).
- :mod:`~workers.memory.cli` ``lineinspect memory add|show|clear``.
"""
