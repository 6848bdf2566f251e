"""ifp-export: export Instruction-Following Pruning (IFPruning) models as per-task pruned variants."""

__version__ = "0.1.0"
