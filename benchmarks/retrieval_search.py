"""Gallery search and fusion cost: ExactIndex vs faiss IndexFlatIP, peak memory, ensemble fusion overhead.

    python benchmarks/retrieval_search.py [--gallery 100000] [--dim 256] [--queries 1000] [--k 10] [--only faiss]

Prints three blocks of figures, each with the ratio that the library promises:

1. exact top-k throughput relative to faiss ``IndexFlatIP`` on the same fp32 gallery
   (``faiss time / ExactIndex time``; target >= 0.9 for the default fp32 storage), and agreement of
   the returned indices;
2. peak extra resident memory of one ``ExactIndex.search`` for two gallery sizes, against the bound
   set by the chunk size (it must not grow with the gallery);
3. ``RetrievalEnsemble.search`` with per-member shortlists: time spent beyond the members' own
   gallery scans (union, re-scoring by every member, fusion) relative to those scans (target <= 5%).

Timings are the minimum over ``--repeats`` runs, with faiss and ExactIndex interleaved so background
load hits both alike. Threads default to 2 for torch and faiss alike.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fashionshoot.retrieval import hyperbolic
from fashionshoot.retrieval.ensemble import RetrievalEnsemble
from fashionshoot.retrieval.index import ExactIndex


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum time of each function, alternating between them so load changes affect all."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


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
    print(f"## exact top-{k}: {len(queries)} queries x {len(gallery)} gallery x {gallery.shape[1]} dims")
    exact32 = ExactIndex(gallery, chunk_size=chunk_size, storage_dtype=torch.float32)
    exact16 = ExactIndex(gallery, chunk_size=chunk_size, storage_dtype=torch.float16)
    fns: dict[str, Callable[[], object]] = {"ExactIndex fp32": lambda: exact32.search(queries, k),
                                            "ExactIndex fp16": lambda: exact16.search(queries, k)}
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss not installed (pip install faiss-cpu): printing ExactIndex timings only")
    if faiss is not None:
        faiss.omp_set_num_threads(torch.get_num_threads())
        flat = faiss.IndexFlatIP(gallery.shape[1])
        flat.add(gallery.numpy())
        q_np = queries.numpy()
        fns["faiss IndexFlatIP"] = lambda: flat.search(q_np, k)
    times = interleaved(fns, repeats)
    for name, seconds in times.items():
        print(f"{name:18s} {seconds:7.3f} s   {len(queries) / seconds:9.0f} queries/s")
    if faiss is not None:
        for name in ("ExactIndex fp32", "ExactIndex fp16"):
            print(f"throughput ratio {name} / faiss: {times['faiss IndexFlatIP'] / times[name]:.3f}  (target >= 0.9)")
        _, faiss_idx = flat.search(q_np, k)
        agree = (exact32.search(queries, k).indices == torch.from_numpy(faiss_idx)).float().mean()
        print(f"index agreement ExactIndex fp32 vs faiss: {agree:.4f}")


def bench_memory(dim: int, queries: torch.Tensor, k: int, chunk_size: int, sizes: tuple[int, ...]) -> None:
    print(f"## peak extra memory of ExactIndex.search (chunk_size {chunk_size}, {len(queries)} queries)")
    bound = (2 * len(queries) * chunk_size + chunk_size * dim) * 4
    for size in sizes:
        index = ExactIndex(unit_rows(size, dim, seed=3), chunk_size=chunk_size, storage_dtype=torch.float16)
        index.search(queries, k)  # allocator warm-up
        extra = peak_extra_rss(lambda index=index: index.search(queries, k))
        print(f"gallery {size:8d} ({index.embeddings.numel() * 2 / 2**20:6.1f} MiB fp16): peak extra "
              f"{extra / 2**20:6.1f} MiB; chunk bound 2*Q*chunk + chunk*dim floats = {bound / 2**20:.1f} MiB")


class _Cosine:
    def __init__(self, name: str) -> None:
        self.name = name


class _Poincare:
    def __init__(self, name: str, c: float = 0.1) -> None:
        self.name, self.c = name, c

    def similarity(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return -hyperbolic.poincare_distance(q, g, self.c)


def bench_fusion(gallery: torch.Tensor, queries: torch.Tensor, k: int, shortlist: int, repeats: int) -> None:
    dim = gallery.shape[1]
    members = {"siglip2": _Cosine("siglip2"), "proxynca": _Cosine("proxynca"), "hyperbolic": _Poincare("hyperbolic")}
    g = {"siglip2": gallery, "proxynca": unit_rows(len(gallery), dim, seed=5),
         "hyperbolic": hyperbolic.expmap0(unit_rows(len(gallery), dim, seed=6), 0.1)}
    q = {"siglip2": queries, "proxynca": unit_rows(len(queries), dim, seed=7),
         "hyperbolic": hyperbolic.expmap0(unit_rows(len(queries), dim, seed=8), 0.1)}
    print(f"## ensemble search: {len(members)} members (2 cosine, 1 Poincaré), shortlist {shortlist} each, top-{k}")
    for fusion in ("zscore", "rrf"):
        ensemble = RetrievalEnsemble(members, fusion=fusion, shortlist=shortlist)
        times = interleaved({
            "members": lambda e=ensemble: [e._member_candidates(n, q[n], g[n], shortlist) for n in members],
            "search": lambda e=ensemble: e.search(q, g, k),
        }, repeats)
        overhead = times["search"] / times["members"] - 1
        print(f"{fusion:7s} members' scans {times['members']:6.3f} s, full search {times['search']:6.3f} s: "
              f"union + re-scoring + fusion overhead {100 * overhead:5.2f}%  (target <= 5%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("faiss", "memory", "fusion"), default=None, help="run one block only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gallery, queries = unit_rows(args.gallery, args.dim, seed=1), unit_rows(args.queries, args.dim, seed=2)
    if args.only in (None, "faiss"):
        bench_faiss(gallery, queries, args.k, args.repeats, args.chunk_size)
    if args.only in (None, "memory"):
        bench_memory(args.dim, queries, args.k, args.chunk_size, (args.gallery // 4, args.gallery))
    if args.only in (None, "fusion"):
        bench_fusion(gallery, queries, args.k, args.shortlist, args.repeats)


if __name__ == "__main__":
    main()
