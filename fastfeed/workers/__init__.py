"""Execution modes (internal): worker processes running the threaded pipeline into shared memory.

In-process threads are the :class:`~fastfeed.pipeline.prefetch.Prefetcher` itself; this
package adds :mod:`.processes` (the worker-process pool) and :mod:`.shm` (the shared-memory
batch slots it writes into). :mod:`fastfeed.pipeline.assemble` decides which mode runs.
"""
