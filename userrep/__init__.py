"""userrep: generalized user representations for transfer learning.

The core library, plain Python + torch; the adapters (components/, pipelines/, serving/,
feature_repo/, k8s/) are thin layers over it. What lives where, bottom up:

data in        contract (tables, columns, checks), data (load a dataset), world (synthetic data),
               importers (Last.fm, Deezer), source (events read lazily), split (evaluation splits)
features       encoders (item vectors), features (the fitted feature space), featurize (user
               features as of a time), partitions (the same, streamed in partitions), state (the
               same, incrementally per event)
model          model (the denoising autoencoder), train (one loop: in-process or Ray Train),
               backfill (every user's embedding), tune (Ray Tune), raylocal (the local Ray session)
Feast          store (snapshots, training sets), onlinestore (online rows), batchrows (a batch's rows)
a batch        batch/: spec (BatchSpec: the one settings object of a retrain), layout (every file
               name: BatchDir), build (a batch in stages), jobs (where the fit runs), downstream +
               heads + predict (task models; their code in tasks/), gate (drift and stability),
               registry (promote, roll back), refresh
               fsio (hashes, atomic writes, the default cut-off)
online         eventlog + sqlitelog + redislog (the durable event log), onlinebatch (what a
               replica holds of a batch), online (the service: logger, consumer, batch swap)
evaluation     evaluate + evaltasks (the protocol), baselines, metrics, uncertainty, report
the command    cli/ (``userrep``), demo (the demo's lifecycle, printed by ``userrep demo``), timing,
               logs (logging's one configuration point), threads (threads per process)
"""
