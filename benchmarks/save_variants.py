"""The folded variants of an export as Hugging Face checkpoints, for the clients compared with it (Optimum):

    python -m benchmarks.save_variants CKPT OUT DIR

Reads OUT's kept indices and writes DIR/<variant>/ with the `write_variant_checkpoint` writer `ifp-export export
--until fold` uses (same bytes), in a process of its own, so the export's timed process does not include it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ifp_export.checkpoint import load_checkpoint
from ifp_export.fold import read_kept_indices, write_variant_checkpoint
from ifp_export.passes.fold import KEPT_INDICES_FILE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path, help="an ifp-export output (its kept indices)")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    weights = load_checkpoint(args.checkpoint).weights
    for name, _, kept in read_kept_indices(args.output / KEPT_INDICES_FILE):
        write_variant_checkpoint(weights, kept, args.directory / name)


if __name__ == "__main__":
    main()
