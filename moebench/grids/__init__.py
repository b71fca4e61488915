"""Grids: the YAML schema, expansion into matched run specs, FLOP matching, and launching with submitit.
May import moebench.core and moebench.training; never moebench.report, bench or cli."""
