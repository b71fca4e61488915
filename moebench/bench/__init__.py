"""Benchmarks: side-by-side timings (MoE layer vs dense FFN of equal active FLOPs), reported as ratios.
May import moebench.core; never moebench.training, grids, report or cli."""
