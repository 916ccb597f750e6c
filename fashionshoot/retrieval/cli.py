"""``fashionshoot build-pairs``: the command-line face of :mod:`fashionshoot.retrieval.build`.

Usage::

    fashionshoot build-pairs [--config configs/build_pairs.yaml] garments=DIR lookbooks=DIR out_dir=DIR [key=value ...]
    accelerate launch -m fashionshoot.cli build-pairs ...     # one process per GPU

Re-running the same command resumes: cached embeddings and finished garment chunks are reused.
"""

from __future__ import annotations

import sys

from fashionshoot.config import config_from_argv
from fashionshoot.errors import FashionshootError


def build_pairs_main(argv: list[str]) -> int:
    """Parse ``[--config FILE] [key=value ...]``, build the pairs, print a summary; exit status."""
    from fashionshoot.retrieval.build import BuildConfig, build_pairs

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        config = config_from_argv(BuildConfig, argv)
        result = build_pairs(config)
    except FashionshootError as exc:
        print(f"build-pairs: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        report = result.report
        tiers = ", ".join(f"{t} {n}" for t, n in report["tiers"].items())
        print(f"{report['pairs']} pairs ({tiers}) from {report['garments']} garments x "
              f"{report['lookbooks']} lookbooks -> {result.manifest}")
        for reason, n in report["fallbacks"].items():
            print(f"  {n} x {reason}")
        print(result.faults.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(build_pairs_main(sys.argv[1:]))
