"""The data path, one stage per module in flow order (internal: users import from ``fastfeed``).

    sampling ──▶ batch ──▶ build ──▶ prefetch ──▶ collate/buffers ──▶ staging ──▶ tap
    (order)     (tasks)   (read →    (threads,    (ring slots)        (device      (times the
                           transform  ordered                          stager)      training loop)
                           → collate) hand-off)

:mod:`.assemble` is the one place that decides how these stages are wired for a loader.
"""
