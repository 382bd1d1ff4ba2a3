"""Private machinery of the drop-in :class:`fastfeed.DataLoader` (not a public API).

- :mod:`.torch_private`: every access to torch's private DataLoader internals, guarded;
- :mod:`.fetch`: what a worker thread does for one task (fetch, collate, IterableDataset
  streams per worker);
- :mod:`.threads`: the thread engine (a worker pool and one epoch's iterator);
- :mod:`.process`: the adapter over torch's worker processes;
- :mod:`.errors`: the user's exception is delivered as the original object, with notes;
- :mod:`.rngstate`: the process-wide RNGs as values (auto's probe, worker_init_fn check);
- :mod:`.state`: ``state_dict()`` / ``load_state_dict()`` (exact mid-epoch resume).
"""
