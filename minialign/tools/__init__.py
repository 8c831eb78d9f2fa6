"""Tools around the course, not part of it.

- ``bench``: speed figures (throughput, MFU, the KV cache, the shared prompt): ``minialign bench``
- ``exercises``: the exercise copy of the package and its grading: ``minialign exercises``
"""
