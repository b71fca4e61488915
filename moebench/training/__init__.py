"""Running one run: spec schema and resolution, the train loop, the runner, records and metrics.
May import moebench.core; never moebench.grids, report, bench or cli."""
