"""The console and the report layer on a big ledger: 1,000,000 rows over 90 days and 500 keys.

    .venv/bin/python bench/console.py [--rows 1000000] [--days 90] [--keys 500] [--repeat 20] [--db PATH]

1. Seeds the ledger (in a temporary directory, or ``--db``, reused when it exists) and rolls it up
   as the gateway's keeper would (the catch-up time is printed).
2. Times each report query (the functions behind ``gateway usage``, ``/admin/usage`` and the console)
   ``--repeat`` times, in this process: p50 and p95 in milliseconds.
3. Starts a keys-mode gateway on that ledger in front of the simulated upstream and loads each
   console page over HTTP ``--repeat`` times (the whole page: routing, access check, queries,
   template): p50 and p95.
4. The ledger's write cost per record, schema 2 (before the roll-ups) against schema 3 (the
   roll-up tables; the write path is unchanged), on ledgers of the same size, interleaved; and the
   keeper's roll-up cost per record, paid on its own thread off the write path.

Run by hand (it takes a few minutes), never in CI. The figures of a run are in bench/README.md.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from gateway.app import create_app
from gateway.config import load_settings
from gateway.demo import DemoState, create_demo_upstream
from gateway.server.thread import serve_in_thread
from gateway.usage.ledger import _write
from gateway.usage.reports import aggregate, summarize
from gateway.usage.rollups import refresh
from gateway.usage.schema import INSERT, MIGRATIONS, UsageRecord, migrate

MODELS = ("Qwen2.5-32B-Instruct-FP8", "DeepSeek-R1-Distill-Qwen-32B", "bge-m3", "Llama-3.3-70B-Instruct",
          "whisper-large-v3", "FLUX.1-schnell", "Kokoro-82M", "Qwen2.5-Coder-32B-Instruct")  # fmt: skip
ADMIN_KEY = "sk-gw-bench-admin-0000"


def records(count: int, days: int, keys: int, end: float, seed: int = 1) -> list[UsageRecord]:
    rng = random.Random(seed)
    out = []
    start = end - days * 86400
    for i in range(count):
        # Half the requests from a few heavy keys, half spread over all of them.
        k = int(rng.paretovariate(1.2)) % keys if rng.random() < 0.5 else rng.randrange(keys)
        refused = rng.random() < 0.03
        prompt, completion = rng.randrange(20, 4000), rng.randrange(0, 800)
        out.append(UsageRecord(
            ts=start + (i + rng.random()) * (days * 86400 / count), request_id=f"bench-{i}",
            key_name=f"key-{k:03d}", team=f"team-{k % 20:02d}", model=MODELS[int(rng.expovariate(0.6)) % len(MODELS)],
            endpoint="/v1/chat/completions", status=429 if refused else 200,
            prompt_tokens=0 if refused else prompt, completion_tokens=0 if refused else completion,
            total_tokens=0 if refused else prompt + completion,
            cost_usd=None if refused else (prompt * 0.15 + completion * 0.6) / 1e6,
            outcome="refused" if refused else "completed", cut=False, latency_ms=rng.random() * 900,
            ttfb_ms=None, cache="hit" if rng.random() < 0.05 else None, saved_usd=None,
        ))  # fmt: skip
    return out


def seed(path: Path, args: argparse.Namespace, end: float) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    migrate(conn)
    if conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] >= args.rows:
        print(f"ledger: {path} already seeded")
        conn.close()
        return
    t = time.perf_counter()
    rows = records(args.rows, args.days, args.keys, end)
    for i in range(0, len(rows), 50_000):
        conn.execute("BEGIN")
        conn.executemany(INSERT, rows[i : i + 50_000])
        conn.execute("COMMIT")
    print(
        f"ledger: {args.rows:,} rows over {args.days} days and {args.keys} keys "
        f"written in {time.perf_counter() - t:.1f} s"
    )
    t = time.perf_counter()
    rolled = refresh(conn)
    took = time.perf_counter() - t
    print(f"roll-up catch-up: {rolled:,} rows in {took:.1f} s ({took / rolled * 1e6:.1f} µs a row, off the write path)")
    hourly, daily = (conn.execute(f"SELECT COUNT(*) FROM usage_{p}").fetchone()[0] for p in ("hourly", "daily"))  # noqa: S608
    print(f"roll-up rows: hourly {hourly:,}, daily {daily:,}; file {path.stat().st_size / 1e6:.0f} MB")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()  # warm (the OS page cache, SQLite's)
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.95))]


def report_queries(path: Path, end: float, repeat: int) -> None:
    day = 86400
    week, month = end - 7 * day, end - 30 * day
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("summarize by key (all 90 days)", lambda: summarize(path, by="key")),
        ("summarize by team", lambda: summarize(path, by="team")),
        ("summarize by model", lambda: summarize(path, by="model")),
        ("summarize by day", lambda: summarize(path, by="day")),
        ("summarize by model, one key", lambda: summarize(path, by="model", key="key-001")),
        ("summarize by key since a time mid-hour", lambda: summarize(path, by="key", since=week + 1234.5)),
        ("cost per hour, 7 days", lambda: aggregate(path, group=("hour",), start=week, end=end)),
        ("cost per day, 90 days", lambda: aggregate(path, group=("day",), start=end - 90 * day, end=end)),
        ("per day and key, 30 days", lambda: aggregate(path, group=("day", "key"), start=month, end=end)),
        ("per hour, top 5 keys, 7 days", lambda: aggregate(path, group=("hour", "key"), start=week, end=end,
                                                           where={"key": tuple(f"key-00{i}" for i in range(5))})),
    ]  # fmt: skip
    print(f"\nreport queries, {repeat} runs each (ms)\n{'query':<44} {'p50':>8} {'p95':>8}")
    for name, fn in cases:
        p50, p95 = timed(fn, repeat)
        print(f"{name:<44} {p50:>8.1f} {p95:>8.1f}")


def screenshot(url: str, target: Path) -> None:
    """The usage page as a browser shows it (Debian's chromium via Playwright), for docs/img/console.png."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1180})
            page.set_extra_http_headers({"Authorization": f"Bearer {ADMIN_KEY}"})
            page.goto(url)
            page.screenshot(path=str(target))
        finally:
            browser.close()
    print(f"screenshot: {target}")


def page_loads(path: Path, tmp: Path, end: float, repeat: int, shot: Path | None = None) -> None:
    import hashlib

    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    budgets = "".join(f'[[keys]]\nname = "key-{k:03d}"\nkey_sha256 = "{hashlib.sha256(f"k{k}".encode()).hexdigest()}"\n'
                      f'team = "team-{k % 20:02d}"\nbudget_usd_daily = 5.0\n' for k in range(50))  # fmt: skip
    config = tmp / "gateway.toml"
    config.write_text(f'[auth]\nmode = "keys"\n[usage]\npath = "{path}"\n[[keys]]\nname = "admin"\n'
                      f'key_sha256 = "{digest}"\nadmin = true\n{budgets}')  # fmt: skip
    today = datetime.fromtimestamp(end, UTC).date()
    pages = {
        "usage, 7 days per hour, by key": f"/console/usage?start={today - timedelta(days=6)}&end={today}&period=hour",
        "usage, 30 days per day, by key": f"/console/usage?start={today - timedelta(days=29)}&end={today}",
        "usage, 90 days per day, by key": f"/console/usage?start={today - timedelta(days=89)}&end={today}",
        "usage, 90 days per day, by model": f"/console/usage?start={today - timedelta(days=89)}&end={today}&by=model",
        "usage, 90 days, one key by model": f"/console/usage?start={today - timedelta(days=89)}&end={today}"
        "&by=model&key=key-001",
        "usage CSV, 90 days by key": f"/console/usage.csv?start={today - timedelta(days=89)}&end={today}",
        "catalog": "/console/catalog",
        "live panel": "/console/live/panel",
        "refusals": "/console/refusals",
        "/admin/usage?by=key": "/admin/usage?by=key",
    }
    with serve_in_thread(create_demo_upstream(DemoState())) as upstream:
        env = {
            "GATEWAY_UPSTREAM_URL": upstream.url,
            "GATEWAY_UPSTREAM_API_KEY": "sk-bench",
            "GATEWAY_LOG_LEVEL": "warning",
        }
        with (
            serve_in_thread(create_app(load_settings(config, env))) as gateway,
            httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as http,
        ):
            for _ in range(100):
                if http.get("/readyz").status_code == 200:
                    break
                time.sleep(0.05)
            if shot is not None:
                screenshot(gateway.url + pages["usage, 7 days per hour, by key"], shot)
            print(f"\nconsole pages over HTTP, {repeat} loads each (ms)\n{'page':<44} {'p50':>8} {'p95':>8} {'KB':>6}")
            for name, url in pages.items():
                answer = http.get(url)
                assert answer.status_code == 200, (url, answer.status_code, answer.text[:300])
                p50, p95 = timed(lambda url=url: http.get(url).raise_for_status(), repeat)  # type: ignore[misc]
                print(f"{name:<44} {p50:>8.1f} {p95:>8.1f} {len(answer.content) / 1024:>6.0f}")


def write_cost(tmp: Path, end: float, rounds: int = 5) -> None:
    """µs per record of the ledger's write path (batches of 500), schema 2 vs 3, ledgers of 300k rows."""
    base = records(300_000, 90, 500, end, seed=2)
    fresh = records(100_000, 1, 500, end + 86400, seed=3)
    dbs = {}
    for version in (2, 3):
        path = tmp / f"write-v{version}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN")
        for statement in (s for step in MIGRATIONS[:version] for s in step):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.executemany(INSERT, base)
        conn.execute("COMMIT")
        if version == 3:
            refresh(conn)
        dbs[version] = conn
    results: dict[int, list[float]] = {2: [], 3: []}
    for r in range(rounds):
        chunk = fresh[r * 20_000 : (r + 1) * 20_000]
        for version in (2, 3) if r % 2 == 0 else (3, 2):
            t = time.perf_counter()
            for i in range(0, len(chunk), 500):
                _write(dbs[version], chunk[i : i + 500])
            results[version].append((time.perf_counter() - t) / len(chunk) * 1e6)
    t = time.perf_counter()
    rolled = refresh(dbs[3])
    keeper = (time.perf_counter() - t) / max(rolled, 1) * 1e6
    v2, v3 = statistics.median(results[2]), statistics.median(results[3])
    print(f"\nledger write path, µs per record (median of {rounds} rounds of 20,000, batches of 500)")
    print(f"schema 2 (no roll-ups) {v2:.2f}   schema 3 (roll-up tables) {v3:.2f}   ratio {v3 / v2:.3f}")
    print(f"the keeper's roll-up of those records, off the write path: {keeper:.2f} µs per record")
    for conn in dbs.values():
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--db", type=Path, help="the seeded ledger to use (made when missing)")
    parser.add_argument("--screenshot", type=Path, help="save the 7-day usage page as a PNG (docs/img/console.png)")
    parser.add_argument("--skip-writes", action="store_true", help="skip the write-cost measurement")
    args = parser.parse_args()
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0).timestamp()
    with tempfile.TemporaryDirectory(prefix="console-bench-") as name:
        tmp = Path(name)
        path = args.db or tmp / "usage.db"
        seed(path, args, end)
        report_queries(path, end, args.repeat)
        page_loads(path, tmp, end, args.repeat, args.screenshot)
        if not args.skip_writes:
            write_cost(tmp, end)


if __name__ == "__main__":
    main()
