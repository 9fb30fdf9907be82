"""A closed-loop HTTP/1.1 load generator: N keep-alive connections, each sending its next request
as soon as the previous answer has been read.

It runs in its own process (``python -m bench.loadgen ...``), so it shares no GIL with the
harness, on asyncio (uvloop when installed) with raw HTTP over asyncio streams: the request
bytes are built once, and an answer is parsed only as far as its status line and framing
(Content-Length or chunked). That costs a few tens of microseconds per request, where an HTTP
client library costs ten times more and would be the bottleneck on a 2-core machine.

The first ``--warmup`` seconds are load but not measured; then every answer completed within
the next ``--duration`` seconds counts. Prints one JSON object:

    requests     answers completed in the measured window
    rps          requests / window seconds
    ok, errors   2xx answers; everything else (non-2xx answers and connection failures)
    statuses     answers per HTTP status; exceptions: failures per exception type
    latency_ms   p50, p90, p99, max, mean of the answers in the window (send to last byte)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.stats import percentile


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)


def build_request(
    method: str, host: str, port: int, path: str, headers: list[str], body: str | None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive"]
    lines += headers
    payload = body.encode() if body is not None else b""
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one answer; return (status, whether the server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    chunked = False
    keep_alive = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            keep_alive = False
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            await reader.readexactly(size + 2)
    elif length is not None:
        if length:
            await reader.readexactly(length)
    else:
        await reader.read()  # no framing: the body ends with the connection
        keep_alive = False
    return status, keep_alive


async def client(
    host: str, port: int, request: bytes, measure_from: float, stop_at: float, tally: Tally
) -> None:
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    while time.perf_counter() < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            started = time.perf_counter()
            writer.write(request)
            status, keep_alive = await read_response(reader)
            ended = time.perf_counter()
            if measure_from <= started and ended <= stop_at:
                tally.latencies_ms.append((ended - started) * 1000)
                tally.statuses[status] += 1
            if not keep_alive:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            if time.perf_counter() >= measure_from:
                tally.exceptions[type(exc).__name__] += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)  # do not spin on a refusing server
    if writer is not None:
        writer.close()


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    request = build_request(args.method, args.host, args.port, args.path, args.header, args.body)
    now = time.perf_counter()
    measure_from = now + args.warmup
    stop_at = measure_from + args.duration
    tally = Tally()
    await asyncio.gather(
        *(
            client(args.host, args.port, request, measure_from, stop_at, tally)
            for _ in range(args.clients)
        )
    )
    latencies = tally.latencies_ms
    ok = sum(n for status, n in tally.statuses.items() if 200 <= status < 300)
    answered = len(latencies)
    failures = sum(tally.exceptions.values())
    return {
        "method": args.method,
        "path": args.path,
        "clients": args.clients,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "requests": answered,
        "rps": answered / args.duration,
        "ok": ok,
        "errors": answered - ok + failures,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "exceptions": dict(tally.exceptions),
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": max(latencies) if latencies else None,
            "mean": sum(latencies) / answered if answered else None,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", default="/")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--body", help="a JSON body (sent with Content-Type: application/json)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    args = parser.parse_args(argv)
    runner: Any = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass
    print(json.dumps(runner(run_load(args))), flush=True)


if __name__ == "__main__":
    main()
