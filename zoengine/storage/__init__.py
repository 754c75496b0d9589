"""zoengine.storage: a run's files on disk, safe against kill -9, full disks and a second run.

``folder`` (the run folder: lock, checkpoints, final outputs), ``layout`` (the names it
reserves), ``final`` (the final outputs' checks and manifest body), ``cleanup`` (removing
checkpoints no manifest names), ``fsio`` (fsync, temp names, atomic writes), ``lock`` (one live
run per folder), ``manifest`` (every file with its SHA-256), ``checkpoint`` (one checkpoint's
files), ``commit`` (the two-phase commit of final outputs), ``modeldir`` (a model folder written
by ``zoengine prune`` / ``merge``). It imports nothing from
zoengine but ``faults`` (named crash points), so the run layer above it and the tests can use
it alone. docs/reliability.md lists each guarantee with its test.
"""
