"""The report: load run records, statistics, tables, rendering (md / csv / html / tex) and plots.
May import moebench.core and moebench.training (records); never moebench.grids, bench or cli."""
