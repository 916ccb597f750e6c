"""Gallery search and fusion cost: ExactIndex vs faiss IndexFlatIP, peak memory, ensemble fusion overhead.

    python benchmarks/retrieval_search.py [--shapes 200000x256x1000,1000000x768x128] [--k 10]
        [--repeats 5] [--threads 2] [--only faiss|memory|fusion] [--fusion-shapes 200000x256x256]
        [--cosine-members 2] [--methods zscore,minmax,weighted,rrf]

Prints three blocks of figures, each with the ratio that the library promises:

1. for each gallery x dims x queries shape: exact top-k throughput relative to faiss ``IndexFlatIP``
   on the same gallery (``faiss time / ExactIndex time``, target >= 0.9) for fp32 and fp16 storage
   (fp32 compute), agreement of the returned indices, and the peak extra memory of each search;
2. peak extra memory of one ``ExactIndex.search`` for two gallery sizes, against the bound set by
   the chunk size (it must not grow with the gallery);
3. fusion, per ``GALLERYxDIMxQUERIES`` shape: ``RetrievalEnsemble.score`` (members' score matrices +
   the fused matrix) against ``member_scores`` alone, per fusion method, for the cosine members alone
   and with a Poincaré member; the fused exact search of the cosine members (one ``ExactIndex`` scan
   over their galleries side by side) against each member's own ``ExactIndex`` search; the shortlist
   search of an ensemble with a Poincaré member against the members' own scans (target <= 5% extra
   everywhere). The one-time cost of the cosine members' gallery moments is printed too.

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


def fusion_members(size: int, dim: int, n_queries: int, cosine: int = 2) -> tuple[dict, dict, dict]:
    """``cosine`` cosine members and one Poincaré member (the Total-Ensemble's geometry) on random data."""
    members: dict = {f"cos{i}": _Cosine(f"cos{i}") for i in range(cosine)}
    g = {name: unit_rows(size, dim, seed=10 + i) for i, name in enumerate(members)}
    q = {name: unit_rows(n_queries, dim, seed=20 + i) for i, name in enumerate(members)}
    members["hyperbolic"] = _Poincare("hyperbolic")
    g["hyperbolic"] = hyperbolic.expmap0(unit_rows(size, dim, seed=6), 0.1)
    q["hyperbolic"] = hyperbolic.expmap0(unit_rows(n_queries, dim, seed=8), 0.1)
    return members, q, g


def report(label: str, times: dict[str, list[float]], base: str, what: str) -> None:
    for name, seconds in times.items():
        if name == base:
            continue
        median, best = ratio(seconds, times[base])
        print(f"{label:32s} {name:9s} {base} {statistics.median(times[base]):7.3f} s, {what} "
              f"{statistics.median(seconds):7.3f} s: fusion adds {100 * (median - 1):6.2f}% "
              f"(best-vs-best {100 * (best - 1):6.2f}%)  (target <= 5%)")


def bench_fusion(size: int, dim: int, n_queries: int, k: int, shortlist: int, repeats: int, cosine: int,
                 methods: tuple[str, ...] = ("zscore", "minmax", "weighted", "rrf"), poincare: bool = True) -> None:
    from fashionshoot.retrieval.ensemble import cached_moments

    members, q, g = fusion_members(size, dim, n_queries, cosine)
    cos = [n for n in members if n.startswith("cos")]
    print(f"## fusion: {n_queries} queries x {size} gallery x {dim} dims, {cosine} cosine"
          f"{' + 1 Poincaré' if poincare else ''} members ({torch.get_num_threads()} threads, {repeats} rounds)")
    start = time.perf_counter()
    for name in cos:
        cached_moments(g[name])
    prep = time.perf_counter() - start
    one = min(rounds({"score": lambda: q[cos[0]] @ g[cos[0]].T}, 1)["score"])
    print(f"gallery moments (once per gallery, cached): {prep:.3f} s for {len(cos)} members = "
          f"{prep / len(cos) / one:.2f}x one member's scoring of these {n_queries} queries")
    # score: members' (Q, G) matrices vs members' matrices + fused matrix, every method in one run.
    for names in (tuple(cos), tuple(members)) if poincare else (tuple(cos),):
        subset = {n: members[n] for n in names}
        fns: dict[str, Callable[[], object]] = {"members": lambda s=subset: RetrievalEnsemble(s).member_scores(q, g)}
        for fusion in methods:
            fns[fusion] = lambda s=subset, f=fusion: RetrievalEnsemble(s, fusion=f).score(q, g)
        # The floor of any fusion that returns its own matrix: members + writing one more (Q, G) matrix.
        fns["+1 matrix"] = lambda s=subset: (RetrievalEnsemble(s).member_scores(q, g),
                                             torch.empty(n_queries, size).fill_(0.0))
        report("score " + "+".join(names), rounds(fns, repeats), "members", "fused")
    # search: the members' own exact top-k scans vs the fused exact search (dot-product fast path).
    subset = {n: members[n] for n in cos}
    fns = {"members": lambda: [ExactIndex(g[n], storage_dtype=g[n].dtype).search(q[n], k) for n in cos]}
    for fusion in ("zscore", "weighted"):
        fns[fusion] = lambda f=fusion: RetrievalEnsemble(subset, fusion=f).search(q, g, k)
    report(f"search top-{k} " + "+".join(cos), rounds(fns, repeats), "members", "fused")
    if not poincare:
        return
    # search with a Poincaré member: per-member shortlists, union re-scored and fused.
    fns = {"members": lambda: [RetrievalEnsemble(members)._member_candidates(n, q[n], g[n], shortlist) for n in members]}
    for fusion in ("zscore", "rrf"):
        fns[fusion] = lambda f=fusion: RetrievalEnsemble(members, fusion=f, shortlist=shortlist).search(q, g, k)
    report(f"search shortlist {shortlist} +hyperbolic", rounds(fns, repeats), "members", "fused")


def parse_shape(text: str) -> tuple[int, int, int]:
    gallery, dim, queries = (int(v) for v in text.lower().split("x"))
    return gallery, dim, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="200000x256x1000,1000000x768x128",
                        help="comma-separated GALLERYxDIMxQUERIES for the faiss block")
    parser.add_argument("--fusion-shapes", default="200000x256x256,200000x768x256",
                        help="comma-separated GALLERYxDIMxQUERIES for the fusion block")
    parser.add_argument("--cosine-members", type=int, default=2, help="cosine members in the fusion block")
    parser.add_argument("--methods", default="zscore,minmax,weighted,rrf", help="fusion methods of the score rows")
    parser.add_argument("--no-poincare", action="store_true", help="fusion block: cosine members only")
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
        for shape in args.fusion_shapes.split(","):
            size, dim, n_queries = parse_shape(shape)
            bench_fusion(size, dim, n_queries, args.k, args.shortlist, args.repeats, args.cosine_members,
                         tuple(args.methods.split(",")), not args.no_poincare)

if __name__ == "__main__":
    main()
