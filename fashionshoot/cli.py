"""The ``fashionshoot`` command: one entry point, one subcommand per job.

Each subcommand is ``fashionshoot NAME [--config FILE] [dotted.key=value ...]`` and is implemented by a
``main(argv) -> int`` function in the module that owns the job; this file only dispatches, importing
the job's module lazily so ``fashionshoot --help`` is instant.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from fashionshoot.errors import FashionshootError

#: subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("fashionshoot.data.synthetic.job", "main",
              "generate the synthetic garment-lookbook set, shard it and read it back"),
    "build-pairs": ("fashionshoot.retrieval.cli", "build_pairs_main",
                    "mine tiered garment-lookbook pairs with the retrieval ensemble"),
    "generate": ("fashionshoot.pipelines.cli", "generate_main",
                 "generate photo-shoot images from garment images, keypoints and a prompt"),
}


def usage() -> str:
    lines = ["usage: fashionshoot COMMAND [--config FILE] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<12} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", "Configs and overrides: see docs/config.md."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fashionshoot: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    job = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(job(rest) or 0)
    except FashionshootError as exc:
        print(f"fashionshoot {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
