"""``--profile``: the workers profiled while a scenario runs, the profiles saved in the results.

- ``py-spy``: ``py-spy record --pid <worker> --subprocesses`` per worker (any pool: prefork
  children are followed), a speedscope JSON per worker (open it at speedscope.app or in
  ``py-spy``'s own viewer). ``--nonblocking`` so the workers are not paused to be sampled.
- ``pyinstrument``: started and stopped inside each worker by the ``bench_profile``
  remote-control command of ``bench.probe``; an HTML and a text profile per worker. It samples
  the worker's main thread, where tasks run under ``-P gevent`` (greenlets) or ``-P solo``.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.polling import HarnessError
from harness.processes import ManagedProcess, spawn

if TYPE_CHECKING:
    from .scenarios.base import Context


class WorkerProfiler:
    def __init__(self, ctx: Context, label: str) -> None:
        self.ctx = ctx
        self.kind = ctx.opts.profile or ""
        self.label = label
        self.spies: list[tuple[ManagedProcess, Path]] = []

    @classmethod
    def maybe(cls, ctx: Context, label: str) -> WorkerProfiler | None:
        """A started profiler if ``--profile`` was given, else None."""
        if not ctx.opts.profile:
            return None
        profiler = cls(ctx, label)
        profiler.start()
        return profiler

    def _path(self, index: int, suffix: str) -> Path:
        return self.ctx.opts.results_dir / f"profile-{self.label}-worker{index}-{self.kind}{suffix}"

    def start(self) -> None:
        if self.kind == "py-spy":
            exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            for worker in self.ctx.workers:
                path = self._path(worker.index, ".speedscope.json")
                argv = [
                    exe,
                    "record",
                    "--pid",
                    str(worker.process.pid),
                    "--subprocesses",
                    "--nonblocking",
                    "--rate",
                    "200",
                    "--format",
                    "speedscope",
                    "--output",
                    str(path),
                ]
                process = spawn(
                    f"py-spy-{worker.index}", argv, env=self.ctx.env, logs=self.ctx.logs
                )
                self.spies.append((process, path))
        elif self.kind == "pyinstrument":
            self._broadcast("start", [(w.nodename, "") for w in self.ctx.workers])

    def stop(self) -> list[str]:
        """Stop profiling; the paths of the profiles written."""
        written: list[str] = []
        if self.kind == "py-spy":
            for process, path in self.spies:
                process.stop(grace=60, sig=signal.SIGINT)  # py-spy writes its file on SIGINT
                if not path.exists():
                    raise HarnessError(f"py-spy wrote no profile:\n{process.log_tail()}")
                written.append(str(path))
        elif self.kind == "pyinstrument":
            targets = [(w.nodename, str(self._path(w.index, ".html"))) for w in self.ctx.workers]
            self._broadcast("stop", targets)
            written = [p for _, p in targets]
        return written

    def _broadcast(self, action: str, targets: list[tuple[str, str]]) -> None:
        for nodename, path in targets:
            replies = self.ctx.app.control.broadcast(
                "bench_profile",
                arguments={"action": action, "path": path},
                destination=[nodename],
                reply=True,
                timeout=30,
            )
            answer: dict[str, Any] = next(iter(replies[0].values()), {}) if replies else {}
            if "error" in answer or not answer:
                raise HarnessError(f"pyinstrument {action} on {nodename}: {answer or 'no reply'}")
