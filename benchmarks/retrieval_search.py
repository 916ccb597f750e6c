"""Gallery search and fusion cost: ExactIndex vs faiss IndexFlatIP, peak memory, ensemble fusion overhead.

    python benchmarks/retrieval_search.py [--shapes 200000x256x1000,1000000x768x128] [--k 10]
        [--repeats 5] [--threads 2] [--only faiss|memory|fusion]

Prints three blocks of figures, each with the ratio that the library promises:

1. for each gallery x dims x queries shape: exact top-k throughput relative to faiss ``IndexFlatIP``
   on the same gallery (``faiss time / ExactIndex time``, target >= 0.9) for fp32 and fp16 storage
   (fp32 compute), agreement of the returned indices, and the peak extra memory of each search;
2. peak extra memory of one ``ExactIndex.search`` for two gallery sizes, against the bound set by
   the chunk size (it must not grow with the gallery);
3. fusion: ``RetrievalEnsemble.score`` (members' scores + fusion) against the members' scoring
   alone, per fusion method (target <= 5% extra), and ``RetrievalEnsemble.search`` with per-member
   shortlists against the members' own gallery scans (union, re-scoring, fusion).

All timings are taken side by side in one process: every round runs each contender once, in turn,
so background load hits all alike; the ratio reported is the median over rounds of the per-round
ratio (the best-round ratio is printed too). Threads default to 2 for torch and faiss alike. Peak
memory is resident memory sampled every 0.5 ms above the level just before the call, with glibc's
mmap threshold pinned so that large buffers are returned to the OS when freed (else a buffer kept by
the allocator from an earlier call would hide the peak).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fashionshoot.retrieval import hyperbolic
from fashionshoot.retrieval.ensemble import RetrievalEnsemble
from fashionshoot.retrieval.index import ExactIndex


def rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per round of each function, alternating between them so load changes affect all."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float]:
    """(median over rounds of numerator/denominator, ratio of the best times)."""
    return (statistics.median(n / d for n, d in zip(numerator, denominator, strict=True)),
            min(numerator) / min(denominator))


def pin_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve allocations above ``nbytes`` by mmap and unmap them when freed (glibc ``mallopt``), so
    resident memory follows live buffers; a no-op where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD (also stops its dynamic growth)
        libc.mallopt(-1, nbytes)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def peak_extra_rss(fn: Callable[[], object], interval: float = 0.0005) -> int:
    """Peak resident memory above the level just before ``fn``, sampled by a background thread."""
    baseline, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn()
    done.set()
    thread.join()
    return max(peak[0], rss_bytes()) - baseline


def unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def bench_faiss(gallery: torch.Tensor, queries: torch.Tensor, k: int, repeats: int, chunk_size: int) -> None:
    size, dim = gallery.shape
    print(f"## exact top-{k}: {len(queries)} queries x {size} gallery x {dim} dims "
          f"({torch.get_num_threads()} threads, {repeats} rounds)")
    exact = {"fp32": ExactIndex(gallery, chunk_size=chunk_size, storage_dtype=torch.float32),
             "fp16": ExactIndex(gallery, chunk_size=chunk_size, storage_dtype=torch.float16)}
    fns: dict[str, Callable[[], object]] = {f"ExactIndex {name}": (lambda ix=ix: ix.search(queries, k))
                                            for name, ix in exact.items()}
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss not installed (pip install faiss-cpu): printing ExactIndex timings only")
    if faiss is not None:
        faiss.omp_set_num_threads(torch.get_num_threads())
        flat = faiss.IndexFlatIP(dim)
        flat.add(gallery.numpy())
        q_np = queries.numpy()
        fns["faiss IndexFlatIP"] = lambda: flat.search(q_np, k)
    times = rounds(fns, repeats)
    for name, seconds in times.items():
        extra = peak_extra_rss(fns[name])
        print(f"{name:18s} median {statistics.median(seconds):7.3f} s  best {min(seconds):7.3f} s  "
              f"{len(queries) / statistics.median(seconds):9.0f} queries/s  peak extra {extra / 2**20:7.1f} MiB")
    rows = min(len(queries), 4096)  # ExactIndex.search's default query_chunk
    buffer = rows * chunk_size * 4
    print(f"score buffer (query block x chunk_size floats): {buffer / 2**20:.1f} MiB; ExactIndex peak extra is "
          f"about 2-3 such buffers (scores, first-chunk top-k, merges) + one converted chunk "
          f"({chunk_size * dim * 4 / 2**20:.1f} MiB), whatever the gallery ({gallery.numel() * 4 / 2**20:.0f} MiB fp32)")
    if faiss is not None:
        for name in exact:
            median, best = ratio(times["faiss IndexFlatIP"], times[f"ExactIndex {name}"])
            print(f"throughput ExactIndex {name} / faiss: median {median:.3f}, best-vs-best {best:.3f}  (target >= 0.9)")
        _, faiss_idx = flat.search(q_np, k)
        agree = (exact["fp32"].search(queries, k).indices == torch.from_numpy(faiss_idx)).float().mean()
        print(f"index agreement ExactIndex fp32 vs faiss: {agree:.4f}")


def bench_memory(dim: int, queries: torch.Tensor, k: int, chunk_size: int, sizes: tuple[int, ...]) -> None:
    print(f"## peak extra memory of ExactIndex.search (chunk_size {chunk_size}, {len(queries)} queries)")
    bound = (3 * len(queries) * chunk_size + chunk_size * dim) * 4
    for size in sizes:
        index = ExactIndex(unit_rows(size, dim, seed=3), chunk_size=chunk_size, storage_dtype=torch.float16)
        index.search(queries, k)  # allocator warm-up
        extra = peak_extra_rss(lambda index=index: index.search(queries, k))
        print(f"gallery {size:8d} ({index.embeddings.numel() * 2 / 2**20:6.1f} MiB fp16): peak extra "
              f"{extra / 2**20:6.1f} MiB; chunk bound 3*Q*chunk + chunk*dim floats = {bound / 2**20:.1f} MiB")


class _Cosine:
    def __init__(self, name: str) -> None:
        self.name = name


class _Poincare:
    def __init__(self, name: str, c: float = 0.1) -> None:
        self.name, self.c = name, c

    def similarity(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return -hyperbolic.poincare_distance(q, g, self.c)


def fusion_members(gallery: torch.Tensor, queries: torch.Tensor) -> tuple[dict, dict, dict]:
    """Two cosine members and one Poincaré member (the Total-Ensemble's geometry) on random data."""
    n, dim = gallery.shape
    members = {"siglip2": _Cosine("siglip2"), "proxynca": _Cosine("proxynca"), "hyperbolic": _Poincare("hyperbolic")}
    g = {"siglip2": gallery, "proxynca": unit_rows(n, dim, seed=5),
         "hyperbolic": hyperbolic.expmap0(unit_rows(n, dim, seed=6), 0.1)}
    q = {"siglip2": queries, "proxynca": unit_rows(len(queries), dim, seed=7),
         "hyperbolic": hyperbolic.expmap0(unit_rows(len(queries), dim, seed=8), 0.1)}
    return members, q, g


def bench_fusion(gallery: torch.Tensor, queries: torch.Tensor, k: int, shortlist: int, repeats: int) -> None:
    members, q, g = fusion_members(gallery, queries)
    print(f"## fusion: {len(queries)} queries x {len(gallery)} gallery x {gallery.shape[1]} dims, "
          f"{len(members)} members (2 cosine, 1 Poincaré)")
    for names in (("siglip2", "proxynca"), tuple(members)):
        subset = {n: members[n] for n in names}
        fns: dict[str, Callable[[], object]] = {
            "members": lambda s=subset: RetrievalEnsemble(s).member_scores(q, g)}
        for fusion in ("zscore", "minmax", "weighted", "rrf"):
            fns[fusion] = lambda s=subset, f=fusion: RetrievalEnsemble(s, fusion=f).score(q, g)
        times = rounds(fns, repeats)
        label = "+".join(names)
        for fusion in ("zscore", "minmax", "weighted", "rrf"):
            median, best = ratio(times[fusion], times["members"])
            print(f"score {label:27s} {fusion:8s} members {statistics.median(times['members']):6.3f} s, "
                  f"fused {statistics.median(times[fusion]):6.3f} s: fusion adds {100 * (median - 1):6.2f}% "
                  f"(best-vs-best {100 * (best - 1):6.2f}%)  (target <= 5%)")
    print(f"## ensemble search: shortlist {shortlist} per member, top-{k}")
    for fusion in ("zscore", "rrf"):
        ensemble = RetrievalEnsemble(members, fusion=fusion, shortlist=shortlist)
        times = rounds({
            "members": lambda e=ensemble: [e._member_candidates(n, q[n], g[n], shortlist) for n in members],
            "search": lambda e=ensemble: e.search(q, g, k),
        }, repeats)
        median, best = ratio(times["search"], times["members"])
        print(f"search {fusion:7s} members' scans {statistics.median(times['members']):6.3f} s, full search "
              f"{statistics.median(times['search']):6.3f} s: union + re-scoring + fusion adds {100 * (median - 1):5.2f}% "
              f"(best-vs-best {100 * (best - 1):5.2f}%)  (target <= 5%)")


def parse_shape(text: str) -> tuple[int, int, int]:
    gallery, dim, queries = (int(v) for v in text.lower().split("x"))
    return gallery, dim, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="200000x256x1000,1000000x768x128",
                        help="comma-separated GALLERYxDIMxQUERIES for the faiss block")
    parser.add_argument("--fusion-shape", default="100000x256x256", help="GALLERYxDIMxQUERIES for the fusion block")
    parser.add_argument("--memory-shape", default="400000x256x1000", help="largest GALLERYxDIMxQUERIES for the memory block")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("faiss", "memory", "fusion"), default=None, help="run one block only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pin_mmap_threshold()
    if args.only in (None, "faiss"):
        for shape in args.shapes.split(","):
            size, dim, n_queries = parse_shape(shape)
            bench_faiss(unit_rows(size, dim, seed=1), unit_rows(n_queries, dim, seed=2), args.k, args.repeats,
                        args.chunk_size)
    if args.only in (None, "memory"):
        size, dim, n_queries = parse_shape(args.memory_shape)
        bench_memory(dim, unit_rows(n_queries, dim, seed=2), args.k, args.chunk_size, (size // 4, size))
    if args.only in (None, "fusion"):
        size, dim, n_queries = parse_shape(args.fusion_shape)
        bench_fusion(unit_rows(size, dim, seed=1), unit_rows(n_queries, dim, seed=2), args.k, args.shortlist,
                     args.repeats)


if __name__ == "__main__":
    main()
