"""Benchmarks and studies behind ``modformer bench NAME`` (``registry.ENTRIES``; ``modformer bench list``).

``common`` holds what they share (device facts, timing, FLOP counting, the result schema and writer, tables);
``studies/`` holds the research studies, one module each."""
