"""Re-ID evaluation at MSMT17 scale: ``evaluate_features`` vs a straightforward baseline.

Synthetic features at MSMT17 test size (11,659 queries x 82,161 gallery, 2048-d float32,
seeded): every query identity has 2..8 gallery images on random cameras (so a few positives per
query), the rest of the gallery are distractor identities; a feature is its identity centroid
plus Gaussian noise, so rankings are realistic (neither perfect nor random).

- ours:     ``evaluate_features`` (query blocks: matmul, value sort, binary search), all queries.
- baseline: the straightforward way, torchreid's ``eval_market1501`` with AGW's mINP: a full
            float32 distance matrix, a full ``np.argsort`` per row, the full ``matches`` matrix,
            a per-query loop (its per-element Python list is replaced by a numpy division, to be
            fair). Its memory grows with num_query x num_gallery (~16 bytes per pair), so it runs
            on the first ``--baseline-queries`` queries against the FULL gallery, and its time is
            extrapolated linearly to all queries (said so in the table).

Each method runs in its own subprocess (same seed, same data), which reports its own peak RSS
(``ru_maxrss``: torch allocations included, unlike tracemalloc) and its RSS once the data exist.
Agreement: ours on the same query subset must equal the baseline run with a stable argsort
exactly, and the baseline with numpy's default (quicksort, as torchreid) up to tie order.

    .venv/bin/python benchmarks/eval_scale.py                # full MSMT17 scale
    .venv/bin/python benchmarks/eval_scale.py --scale 0.05   # quick run
Targets (full scale, 2 cores): ours <= 60 s wall and <= 3 GB peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MSMT17 = {"num_query": 11659, "num_gallery": 82161, "num_ids": 3060, "num_cams": 15}
TARGET_SECONDS, TARGET_GB = 60.0, 3.0
GB = 1024**3


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sizes(scale: float) -> dict[str, int]:
    return {k: max(2, round(v * scale)) if k != "num_cams" else v for k, v in MSMT17.items()}


def make_data(scale: float, dim: int, seed: int, sigma: float):
    """Seeded synthetic features and labels; identical in every process for the same arguments."""
    import numpy as np
    import torch

    s = sizes(scale)
    nq, ng, n_ids, n_cams = s["num_query"], s["num_gallery"], s["num_ids"], s["num_cams"]
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, n_ids, nq)
    per_id = rng.integers(2, 9, n_ids)  # 2..8 gallery images per query identity
    per_id = per_id[: np.searchsorted(np.cumsum(per_id), ng, side="right")]
    g_true = np.repeat(np.arange(len(per_id)), per_id)
    n_distractors = ng - len(g_true)
    n_distractor_ids = max(1, n_distractors // 27)
    g_pids = np.concatenate([g_true, n_ids + rng.integers(0, n_distractor_ids, n_distractors)])
    g_pids = g_pids[rng.permutation(ng)]
    q_cams, g_cams = rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)

    gen = torch.Generator().manual_seed(seed)
    centroids = torch.randn(n_ids + n_distractor_ids, dim, generator=gen)

    def features(pids: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(pids), dim)
        for a in range(0, len(pids), 4096):  # in blocks: no full-size temporaries
            idx = torch.from_numpy(pids[a:a + 4096])
            out[a:a + 4096] = torch.randn(len(idx), dim, generator=gen).mul_(sigma).add_(centroids[idx])
        return out

    qf, gf = features(q_pids), features(g_pids)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def baseline_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, kind: str = "quicksort"):
    """torchreid's ``eval_market1501`` (full argsort + matches matrix + loop) with AGW's mINP."""
    import numpy as np

    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind=kind)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(num_q):
        order = indices[q]
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        raw_cmc = matches[q][keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        all_inp.append(cmc[np.flatnonzero(raw_cmc)[-1]] / (np.flatnonzero(raw_cmc)[-1] + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        precision = raw_cmc.cumsum() / np.arange(1.0, len(raw_cmc) + 1)
        all_ap.append((precision * raw_cmc).sum() / raw_cmc.sum())
    cmc = np.asarray(all_cmc, dtype=np.float64).mean(axis=0)
    return {"mAP": float(np.mean(all_ap)), "cmc": cmc.tolist(), "mINP": float(np.mean(all_inp)),
            "num_valid_queries": len(all_ap), "num_skipped_queries": num_q - len(all_ap)}


def _metrics_dict(m) -> dict:
    return {"mAP": m.mAP, "cmc": m.cmc.tolist(), "mINP": m.mINP,
            "num_valid_queries": m.num_valid_queries, "num_skipped_queries": m.num_skipped_queries}


def child(args: argparse.Namespace) -> dict:
    """One method in this (fresh) process; returns timings, memory and metrics."""
    import torch

    from muva_core.eval import evaluate_features, pairwise_distance

    rss_start = current_rss()
    qf, gf, q_pids, g_pids, q_cams, g_cams = make_data(args.scale, args.dim, args.seed, args.sigma)
    out: dict = {"role": args.role, "rss_start": rss_start, "rss_data": current_rss(),
                 "threads": torch.get_num_threads(), "num_gallery": len(g_pids)}
    n_sub = min(args.baseline_queries, len(q_pids))
    sub = (q_pids[:n_sub], g_pids, q_cams[:n_sub], g_cams)
    if args.role == "ours":
        t0, c0 = time.perf_counter(), time.process_time()
        m = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=args.metric,
                              chunk_size=args.chunk_size, progress=args.progress)
        out.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                   peak_rss=peak_rss(), queries=len(q_pids),
                   metrics=_metrics_dict(m))
        # untimed: the same query subset as the baseline, for the agreement check
        m_sub = evaluate_features(qf[:n_sub], gf, *sub, metric=args.metric, chunk_size=args.chunk_size)
        out["metrics_subset"] = _metrics_dict(m_sub)
    else:
        t0, c0 = time.perf_counter(), time.process_time()
        distmat = pairwise_distance(qf[:n_sub], gf, args.metric, chunk_size=args.chunk_size).numpy()
        t_dist = time.perf_counter() - t0
        m = baseline_eval(distmat, *sub)
        out.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                   seconds_distmat=t_dist, peak_rss=peak_rss(),
                   queries=n_sub, metrics_subset=m)
        if args.check_stable:  # untimed, after the memory reading
            out["metrics_subset_stable"] = baseline_eval(distmat, *sub, kind="stable")
    return out


def run_child(role: str, args: argparse.Namespace) -> dict:
    """Run one method in a fresh interpreter, so that peak memory readings do not mix."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--role", role, "--result", str(result),
               "--scale", str(args.scale), "--dim", str(args.dim), "--seed", str(args.seed),
               "--sigma", str(args.sigma), "--metric", args.metric, "--chunk-size", str(args.chunk_size),
               "--baseline-queries", str(args.baseline_queries)]
        cmd += ["--progress"] if args.progress else []
        cmd += ["--no-check-stable"] if not args.check_stable else []
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        subprocess.run(cmd, check=True, env=env)
        return json.loads(result.read_text())


def compare(a: dict, b: dict) -> float:
    """Largest absolute difference over mAP, mINP and the CMC curve (and counts must match)."""
    import numpy as np

    if (a["num_valid_queries"], a["num_skipped_queries"]) != (b["num_valid_queries"], b["num_skipped_queries"]):
        return float("inf")
    n = min(len(a["cmc"]), len(b["cmc"]))
    return float(max(abs(a["mAP"] - b["mAP"]), abs(a["mINP"] - b["mINP"]),
                     np.max(np.abs(np.subtract(a["cmc"][:n], b["cmc"][:n])))))


def report(args: argparse.Namespace, ours: dict, base: dict | None) -> bool:
    s = sizes(args.scale)
    nq, ng = s["num_query"], s["num_gallery"]
    print(f"\nRe-ID evaluation, {nq:,} queries x {ng:,} gallery, {args.dim}-d float32, "
          f"metric={args.metric}, scale={args.scale}, {ours['threads']} torch threads, chunk {args.chunk_size}")
    m = ours["metrics"]
    print(f"ours: mAP {100 * m['mAP']:.2f}%  Rank-1 {100 * m['cmc'][0]:.2f}%  mINP {100 * m['mINP']:.2f}%  "
          f"({m['num_valid_queries']} valid, {m['num_skipped_queries']} skipped queries)")
    rows = [("ours: evaluate_features", f"{nq:,}", ours["seconds"], ours["cpu_seconds"], ours["peak_rss"],
             ours["rss_data"], "measured")]
    ok = True
    if base is not None:
        extrap = base["queries"] < nq
        t_full = base["seconds"] * nq / base["queries"]
        cpu_full = base["cpu_seconds"] * nq / base["queries"]
        rows.append(("baseline: distmat+argsort+loop", f"{base['queries']:,}", base["seconds"],
                     base["cpu_seconds"], base["peak_rss"], base["rss_data"], "measured"))
        if extrap:
            rows.append(("baseline, all queries", f"{nq:,}", t_full, cpu_full, None, None,
                         "times EXTRAPOLATED linearly"))
    print(f"\n{'method':34s} {'queries':>8s} {'wall s':>9s} {'CPU s':>9s} {'peak RSS GB':>12s} "
          f"{'data RSS GB':>12s}  note")
    for name, q, t, cpu, peak, data, note in rows:
        peak_s = f"{peak / GB:12.2f}" if peak is not None else f"{'-':>12s}"
        data_s = f"{data / GB:12.2f}" if data is not None else f"{'-':>12s}"
        print(f"{name:34s} {q:>8s} {t:9.2f} {cpu:9.2f} {peak_s} {data_s}  {note}")
    print("(CPU s = user+sys of all threads; data RSS = after imports and data generation, before timing)")
    if base is not None:
        per_pair = 4 + 8 + 4  # float32 distmat + int64 argsort + int32 matches
        est = base["rss_data"] + per_pair * nq * ng
        print(f"baseline at all {nq:,} queries would hold ~{est / GB:.1f} GB (distmat + argsort + matches "
              f"+ data; estimated, not measured)")
        sub_q = base["queries"]
        t_ours_same = ours["seconds"] * sub_q / nq
        print(f"\nratios baseline/ours: CPU time {cpu_full / ours['cpu_seconds']:.1f}x, wall"
              f" time {t_full / ours['seconds']:.1f}x at {nq:,} queries"
              + (f" (baseline extrapolated; {base['seconds'] / t_ours_same:.1f}x at {sub_q:,} queries with ours"
                 f" prorated)" if extrap else "")
              + f"; peak RSS {base['peak_rss'] / ours['peak_rss']:.2f}x"
              + (f" (baseline on {sub_q:,} queries only)" if extrap else ""))
        d_quick = compare(ours["metrics_subset"], base["metrics_subset"])
        print(f"agreement on the first {sub_q:,} queries: max |diff| vs baseline (quicksort argsort, "
              f"as torchreid; ties in arbitrary order) = {d_quick:.2e}")
        if "metrics_subset_stable" in base:
            d_stable = compare(ours["metrics_subset"], base["metrics_subset_stable"])
            print(f"                                     max |diff| vs baseline with stable argsort "
                  f"(same tie rule) = {d_stable:.2e}  -> {'EQUAL' if d_stable < 1e-12 else 'DIFFERENT'}")
            ok &= d_stable < 1e-12
        ok &= d_quick < 1e-4
    if args.scale == 1.0:
        t_ok, m_ok = ours["seconds"] <= TARGET_SECONDS, ours["peak_rss"] <= TARGET_GB * GB
        print(f"\ntargets at full scale: wall {ours['seconds']:.1f} s <= {TARGET_SECONDS:.0f} s: "
              f"{'PASS' if t_ok else 'FAIL'}; peak RSS {ours['peak_rss'] / GB:.2f} GB <= {TARGET_GB:.0f} GB: "
              f"{'PASS' if m_ok else 'FAIL'}")
        busy = ours["cpu_seconds"] / ours["seconds"]
        if busy < 0.8 * ours["threads"]:
            print(f"  note: ours kept only {busy:.2f} of {ours['threads']} cores busy (CPU {ours['cpu_seconds']:.1f} s"
                  f" / wall {ours['seconds']:.1f} s): the machine was contended; uncontended wall is about "
                  f"{ours['cpu_seconds'] / ours['threads']:.1f} s")
        ok &= t_ok and m_ok
    else:
        print(f"\ntargets ({TARGET_SECONDS:.0f} s, {TARGET_GB:.0f} GB) apply at --scale 1.0 only: not checked")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the MSMT17 query/gallery/id counts")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma", type=float, default=3.0, help="feature noise around identity centroids")
    p.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--baseline-queries", type=int, default=2000,
                   help="queries (against the full gallery) the baseline runs on; its time is extrapolated")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--no-check-stable", dest="check_stable", action="store_false",
                   help="skip the untimed stable-argsort baseline used for the exact agreement check")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json-out", type=Path, help="also write all measurements here")
    p.add_argument("--role", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        p.error("--scale must be in (0, 1]")
    if args.role:
        args.result.write_text(json.dumps(child(args)))
        return 0
    ours = run_child("ours", args)
    base = None if args.skip_baseline else run_child("baseline", args)
    ok = report(args, ours, base)
    if args.json_out:
        from muva_core.io import write_json

        write_json(args.json_out, {"args": {k: (str(v) if isinstance(v, Path) else v)
                                            for k, v in vars(args).items()}, "ours": ours, "baseline": base})
    print("\nOVERALL:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
