"""`fashionshoot synth`: generate the synthetic set, shard it, and read it back as training will.

This is the embedded default job: on a fresh machine, with no downloads, it exercises the whole data
path (generator -> pair manifest -> WebDataset shards -> streaming reader) and prints what came back,
so a user sees in seconds that the install works and what a pair looks like.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fashionshoot.config import config_from_argv, save_config
from fashionshoot.data.synthetic.config import SyntheticConfig
from fashionshoot.data.synthetic.writer import write_synthetic_set


@dataclass
class SynthJobConfig:
    """Where to write the set, how to shard it, and the generator's own settings."""

    out_dir: str = "runs/synthetic"
    samples_per_shard: int = 100
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


def run(config: SynthJobConfig) -> dict[str, Counter]:
    """Generate, shard and stream back the set; returns the counts of what was read back."""
    from fashionshoot.data.pairs import read_manifest
    from fashionshoot.data.shards import PairShardStream, write_pair_shards

    out = Path(config.out_dir)
    save_config(config, out)
    start = time.perf_counter()
    dataset = write_synthetic_set(out / "dataset", config.synthetic)
    records = read_manifest(dataset / "pairs.jsonl")
    generated = time.perf_counter() - start
    index = write_pair_shards(records, dataset, out / "shards", samples_per_shard=config.samples_per_shard)
    stream = PairShardStream(out / "shards", rank=0, world_size=1)
    counts: dict[str, Counter] = {"split": Counter(), "tier": Counter(), "category": Counter()}
    sizes: Counter = Counter()
    for sample in stream:
        record = sample["record"]
        counts["split"][record.split] += 1
        counts["tier"][record.tier] += 1
        counts["category"][record.category] += 1
        sizes[(sample["garment"].size, sample["lookbook"].size)] += 1
    print(f"generated {len(records)} pairs ({config.synthetic.num_garments} garments) in {generated:.1f} s -> {dataset}")
    print(f"wrote {len(index.shards)} shard(s) -> {out / 'shards'}")
    print(f"read back {sum(counts['split'].values())} pairs from the shards; {stream.faults.summary()}")
    for name, counter in counts.items():
        print(f"  by {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(counter.items())))
    for (garment_size, lookbook_size), n in sizes.items():
        print(f"  image sizes (w, h): garment {garment_size}, lookbook {lookbook_size} x {n}")
    first = records[0]
    print(f"  first pair: {first.pair_id}: {first.metadata.get('title', '')!r} -> {first.lookbook_image}")
    print(f"resolved config: {out / 'config.yaml'}")
    return counts


def main(argv: Sequence[str]) -> int:
    run(config_from_argv(SynthJobConfig, argv))
    return 0

