"""Soak runs: memory stays flat, nothing leaks, every epoch is exact, chaos is counted exactly.

Four parts, each selectable by flag (all of them when none is given) and sized by flags:

``--rss``     1e6 samples over 3 epochs; RSS sampled every 10k samples. Pass: RSS at the
              end within 2 % of RSS after the warm-up (the first 10 %), every epoch exact.
``--cycles``  1,000 create / iterate a few batches / break cycles (Loader and DataLoader
              alternating). Pass: threads and fds back at the baseline.
``--epochs``  100 short epochs on one persistent Loader and one DataLoader with
              ``persistent_workers=True``. Pass: the ledger exact in every epoch.
``--chaos``   1e5 samples with 1 % random faults (exceptions, stalls, corrupt bytes) in
              ``on_error="skip"``. Pass: skipped == injected exceptions + corruptions,
              exactly, and everything else delivered exactly once.

Records are ledger records (index + content hash, see ``fastfeed.testing``), so every
delivered sample is checked for identity and content. Run from the repository root::

    python benchmarks/soak.py                       # everything, default sizes
    python benchmarks/soak.py --rss --rss-samples 200000 --json soak.json
    python benchmarks/soak.py --cycles --cycles-count 200 --epochs --epochs-count 20

Prints a table and writes JSON (with the environment); exits 1 if any part failed.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_json

from fastfeed.dataloader import DataLoader
from fastfeed.loader import Loader
from fastfeed.testing import (
    FaultySource,
    Ledger,
    LedgerDataset,
    LedgerDecode,
    LedgerSource,
    ResourceSnapshot,
    chaos_plan,
    rss_bytes,
)

_MIB = float(1 << 20)


def _rss_part(args: argparse.Namespace) -> dict[str, Any]:
    """Long run with RSS samples; pass when RSS after warm-up grows < ``rss_growth_limit``."""
    n = math.ceil(args.rss_samples / args.rss_epochs)
    src = LedgerSource(n, pad_bytes=args.record_bytes - 16)
    loader = Loader(
        src,
        LedgerDecode(),
        batch_size=args.batch_size,
        shuffle=True,
        num_threads=args.threads,
        profile=args.profile,
    )
    samples: list[tuple[int, float]] = []  # (samples delivered, RSS MiB)
    delivered, next_sample = 0, 0
    problems: list[str] = []
    ledger = Ledger(range(n))  # one preallocated ledger, reset per epoch: flat memory
    t0 = time.perf_counter()
    for epoch in range(args.rss_epochs):
        loader.set_epoch(epoch)
        ledger.reset()
        for batch in loader:
            ledger.add(batch)
            delivered += len(batch.indices)
            if delivered >= next_sample:
                samples.append((delivered, rss_bytes() / _MIB))
                next_sample += args.rss_every
        problems += [f"epoch {epoch}: {p}" for p in ledger.problems()]
    elapsed = time.perf_counter() - t0
    samples.append((delivered, rss_bytes() / _MIB))
    loader.close()
    src.close()
    warm_at = int(args.rss_warmup * delivered)
    warm = next(r for s, r in samples if s >= warm_at)
    after = [r for s, r in samples if s >= warm_at]
    growth = (samples[-1][1] - warm) / warm
    peak_growth = (max(after) - warm) / warm
    ok = growth < args.rss_growth_limit and not problems
    return {
        "part": "rss",
        "ok": ok,
        "samples": delivered,
        "epochs": args.rss_epochs,
        "profile": args.profile,
        "seconds": elapsed,
        "samples_per_s": delivered / elapsed,
        "rss_start_mib": samples[0][1],
        "rss_warm_mib": warm,
        "rss_end_mib": samples[-1][1],
        "rss_growth_after_warmup": growth,
        "rss_peak_growth_after_warmup": peak_growth,
        "rss_samples": samples,
        "problems": problems[:20],
    }


def _cycles_part(args: argparse.Namespace) -> dict[str, Any]:
    """Create, iterate 0..3 batches, break; repeat. Pass when nothing outlives the loop."""
    rng = random.Random(0)
    gc.collect()
    baseline = ResourceSnapshot()
    peak_threads = peak_fds = 0
    checkpoints: list[tuple[int, int, int]] = []
    t0 = time.perf_counter()
    for cycle in range(args.cycles):
        take = rng.randint(0, 3)
        if cycle % 2 == 0:
            src = LedgerSource(1024)
            loader: Any = Loader(
                src, LedgerDecode(), batch_size=32, shuffle=True, num_threads=args.threads
            )
        else:
            src = None
            loader = DataLoader(
                LedgerDataset(1024), batch_size=32, shuffle=True, num_workers=args.threads
            )
        it = iter(loader)
        for batch in itertools.islice(it, take):
            assert len(batch[0]) == 32
        if cycle % 4 == 1:
            loader.close()  # half the DataLoader cycles close explicitly, half just drop
        del it, loader
        if src is not None:
            src.close()
        snap = ResourceSnapshot()
        peak_threads = max(peak_threads, len(snap.threads))
        peak_fds = max(peak_fds, len(snap.fds))
        if (cycle + 1) % max(1, args.cycles // 10) == 0:
            checkpoints.append((cycle + 1, len(snap.threads), len(snap.fds)))
    elapsed = time.perf_counter() - t0
    gc.collect()
    end = ResourceSnapshot.settle(baseline, timeout_s=5.0)
    excess = end.excess_over(baseline)
    return {
        "part": "cycles",
        "ok": not excess,
        "cycles": args.cycles,
        "seconds": elapsed,
        "baseline_threads": len(baseline.threads),
        "baseline_fds": len(baseline.fds),
        "end_threads": len(end.threads),
        "end_fds": len(end.fds),
        "peak_threads": peak_threads,
        "peak_fds": peak_fds,
        "checkpoints_cycle_threads_fds": checkpoints,
        "excess": excess,
    }


def _epochs_part(args: argparse.Namespace) -> dict[str, Any]:
    """Many short epochs on persistent loaders; pass when every epoch's ledger is exact."""
    n = args.epoch_samples
    src = LedgerSource(n)
    loader = Loader(src, LedgerDecode(), batch_size=64, shuffle=True, num_threads=args.threads)
    compat = DataLoader(
        LedgerDataset(n),
        batch_size=64,
        shuffle=True,
        num_workers=args.threads,
        persistent_workers=True,
    )
    problems: list[str] = []
    orders: set[tuple[int, ...]] = set()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for name, impl in (("Loader", loader), ("DataLoader", compat)):
            ledger = Ledger(range(n))
            first: list[int] = []
            for batch in impl:
                ledger.add(batch)
                if not first:
                    first = batch[0][:, 0].tolist()
            problems += [f"{name} epoch {epoch}: {p}" for p in ledger.problems()]
            orders.add((name == "Loader", *first))
    elapsed = time.perf_counter() - t0
    loader.close()
    compat.close()
    src.close()
    return {
        "part": "epochs",
        "ok": not problems,
        "epochs": args.epochs,
        "samples_per_epoch": n,
        "seconds": elapsed,
        "distinct_first_batches": len(orders),  # reshuffled every epoch: ~2 * epochs
        "problems": problems[:20],
    }


def _chaos_part(args: argparse.Namespace) -> dict[str, Any]:
    """1 % random exceptions, stalls and corrupt records in skip mode; counted exactly."""
    n = args.chaos_samples
    plan = chaos_plan(n, args.chaos_rate, seed=args.seed)
    src = FaultySource(
        LedgerSource(n),
        raise_at=plan["raise"],
        stall_at=plan["stall"],
        corrupt_at=plan["corrupt"],
        stall_s=args.stall_s,
    )
    loader = Loader(
        src,
        LedgerDecode(),
        batch_size=args.batch_size,
        shuffle=True,
        in_order=False,
        num_threads=args.threads,
        on_error="skip",
    )
    ledger = Ledger(range(n))
    t0 = time.perf_counter()
    for batch in loader:
        ledger.add(batch)
    elapsed = time.perf_counter() - t0
    skipped = [s.index for s in loader.skipped]
    injected = plan["raise"] | plan["corrupt"]
    problems = ledger.problems(skipped=skipped, injected=injected)
    stages = {
        stage: sum(1 for s in loader.skipped if s.stage == stage) for stage in ("read", "decode")
    }
    stalls_delivered = len(plan["stall"] & ledger.delivered)
    ok = (
        not problems
        and stages == {"read": len(plan["raise"]), "decode": len(plan["corrupt"])}
        and stalls_delivered == len(plan["stall"])
        and src.fired["stall"] == plan["stall"]
    )
    loader.close()
    src.close()
    return {
        "part": "chaos",
        "ok": ok,
        "samples": n,
        "seconds": elapsed,
        "injected_raise": len(plan["raise"]),
        "injected_corrupt": len(plan["corrupt"]),
        "injected_stall": len(plan["stall"]),
        "skipped": len(skipped),
        "skipped_by_stage": stages,
        "stalled_and_delivered": stalls_delivered,
        "delivered": ledger.total,
        "problems": problems[:20],
    }


_PARTS = {"rss": _rss_part, "cycles": _cycles_part, "epochs": _epochs_part, "chaos": _chaos_part}


def _summary(res: dict[str, Any]) -> str:
    part = res["part"]
    if part == "rss":
        return (
            f"{res['samples']:,} samples / {res['epochs']} epochs, profile={res['profile']}, "
            f"RSS {res['rss_warm_mib']:.0f} "
            f"-> {res['rss_end_mib']:.0f} MiB after warm-up "
            f"({100 * res['rss_growth_after_warmup']:+.2f} %, peak "
            f"{100 * res['rss_peak_growth_after_warmup']:+.2f} %)"
        )
    if part == "cycles":
        return (
            f"{res['cycles']} cycles: threads {res['baseline_threads']} -> {res['end_threads']}, "
            f"fds {res['baseline_fds']} -> {res['end_fds']} (peak {res['peak_threads']} "
            f"threads, {res['peak_fds']} fds)"
        )
    if part == "epochs":
        return (
            f"{res['epochs']} epochs x 2 loaders x {res['samples_per_epoch']} samples, "
            f"{len(res['problems'])} problems"
        )
    return (
        f"{res['samples']:,} samples: injected {res['injected_raise']} raise + "
        f"{res['injected_corrupt']} corrupt (+ {res['injected_stall']} stalls), "
        f"skipped {res['skipped']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in _PARTS:
        p.add_argument(
            f"--{name}", dest=f"part_{name}", action="store_true", help=f"run the {name} part"
        )
    p.add_argument("--threads", type=int, default=2, help="loader worker threads")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--record-bytes", type=int, default=1024, help="record size, bytes (>= 16)")
    p.add_argument("--rss-samples", type=int, default=1_000_000)
    p.add_argument("--rss-epochs", type=int, default=3)
    p.add_argument("--rss-every", type=int, default=10_000, help="RSS sample interval")
    p.add_argument("--rss-warmup", type=float, default=0.1, help="warm-up fraction of the run")
    p.add_argument("--rss-growth-limit", type=float, default=0.02)
    p.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="rss part: Loader(profile=False) (the recorder's trace rings fill over ~30k "
        "batches and grow RSS until then)",
    )
    p.add_argument("--cycles-count", dest="cycles", type=int, default=1000)
    p.add_argument("--epochs-count", dest="epochs", type=int, default=100)
    p.add_argument("--epoch-samples", type=int, default=2000)
    p.add_argument("--chaos-samples", type=int, default=100_000)
    p.add_argument("--chaos-rate", type=float, default=0.01)
    p.add_argument("--stall-s", type=float, default=0.02, help="length of one stall, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="soak.json", help="output JSON path")
    args = p.parse_args(argv)
    if args.record_bytes < 16:
        p.error("--record-bytes must be >= 16")
    chosen = [name for name in _PARTS if getattr(args, f"part_{name}")] or list(_PARTS)

    results = []
    for name in chosen:
        print(f"running {name} ...", flush=True)
        results.append(_PARTS[name](args))
    rows = [
        {
            "part": r["part"],
            "result": "PASS" if r["ok"] else "FAIL",
            "seconds": r["seconds"],
            "summary": _summary(r),
        }
        for r in results
    ]
    print_table(rows, title="fastfeed soak (measured while other jobs shared the CPU)")
    for r in results:
        for problem in r.get("problems", []):
            print(f"  {r['part']}: {problem}")
        if r.get("excess"):
            print(f"  {r['part']}: {r['excess']}")
    path = write_json(args.json, {"args": vars(args), "parts": results})
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
