"""worker: the miner loop (rng -> hasher -> coin check -> Redis), the original's keys exactly."""
