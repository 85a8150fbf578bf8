"""Helpers shared by every test tier (importable as ``support`` through ``tests/conftest.py``):

- ``support.cli``: the one launcher of ``python -m training ...`` and the one ``wait_for``;
- ``support.runs``: a small run's config, reading a run back from storage, comparisons;
- ``support.ray_cluster``: the one builder of a real multi-node Ray cluster on this machine;
- ``support.s3``: the one SeaweedFS S3 server helper (the session fixture is in conftest.py).
"""
