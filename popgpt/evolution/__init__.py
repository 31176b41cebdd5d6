"""The evolution experiment: a backdoor virus, selection, crossover and mutation over a population,
its run folder, and the experiments on a finished run (report, vaccination, revival)."""
