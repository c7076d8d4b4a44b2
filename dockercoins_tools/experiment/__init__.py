"""`dockercoins experiment`: scale workers and rng, measure the honest rate, compare with the model.

One code path drives every backend: for each point of the sweep it sets the rng
mode and replicas, scales the workers, waits until that many workers are really
mining, waits a warm-up, then samples the `hashes` counter (timestamped by Redis
`TIME`) over a window and fits a least-squares slope with its standard error
(`dockercoins.rate`). A backend only decides how to scale and where to read:
`LocalBackend` runs the stack as local processes, `KubectlBackend` runs
`kubectl scale` and reads the web UI's `/json`.
"""
