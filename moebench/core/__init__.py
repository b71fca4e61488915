"""The MoE core: routing contract, registry, MoE layer, experts, moefy, models and the task contract.
May import torch and the standard library only; never moebench.training, grids, report, bench or cli."""
