"""`python -m imatsample serve --out DIR [--kind demo] [--seed 0]`: the server for the demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path


from imatdata.storage import write_bytes_atomic
from imatsample.catalogue import big_catalogue, build_catalogue
from imatsample.lists import write_lists
from imatsample.server import SampleServer
# --------------------------------------------------------------------------------------------



async def _serve_forever(kind: str, seed: int, out: Path, records: int) -> None:
    catalogue = big_catalogue(records, seed) if kind == "big" else build_catalogue(kind, seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGBREAK is what Ctrl-Break (and CTRL_BREAK_EVENT from a parent) sends on Windows.
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGBREAK", None)):
        if sig is None:
            continue
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: fall back to signal.signal
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    async with SampleServer(catalogue, track_paths=kind != "big") as srv:
        paths = write_lists(catalogue, srv, out)
        write_bytes_atomic(json.dumps({"port": srv.port, "pid": os.getpid(), "kind": kind, "seed": seed,
                                       "url": srv.base_url,
                                       "lists": {k: str(v) for k, v in paths.items()}}).encode(),
                           out / "server.json")
        print(f"sample server ({kind}, {len(catalogue)} records) at {srv.base_url} - lists in {out}",
              flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imatsample",
                                     description="Serve a seeded sample image catalogue on 127.0.0.1.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the server, write the URL lists and server.json")
    serve.add_argument("--out", type=Path, required=True, help="folder for train/val/test.json and server.json")
    serve.add_argument("--kind", choices=("demo", "faults", "big"), default="demo")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--records", type=int, default=1_000_000, help="list length for --kind big")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve_forever(args.kind, args.seed, args.out, args.records))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
