"""Background prefetch for the latent loader: the next batches are read and assembled while the
training step runs, and the time the step still waits for data is measured.

Threads, not processes: reading Parquet row groups and copying their bytes into tensors happens in
C++ / numpy with the GIL released, and threads share the memory-mapped shards without pickling the
batches back. At most `depth` batches are in flight, so memory stays bounded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor


class Prefetcher:
    """Calls `make(item)` for the items of an iterable on `threads` background threads, at most
    `depth` ahead of the consumer, and yields (item, result, seconds waited) in the items' order."""

    def __init__(self, make: Callable, *, depth: int = 4, threads: int = 2):
        if depth < 1 or threads < 1:
            raise ValueError(f"prefetch depth={depth}, threads={threads}: both must be >= 1")
        self.make, self.depth, self.threads = make, depth, threads

    def run(self, items) -> Iterator[tuple[object, object, float]]:
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="pomvid-prefetch")
        pending: deque[tuple[object, Future]] = deque()
        source = iter(items)
        try:
            while True:
                while len(pending) < self.depth:  # keep the queue full
                    item = next(source, _END)
                    if item is _END:
                        break
                    pending.append((item, pool.submit(self.make, item)))
                if not pending:
                    return
                item, future = pending.popleft()
                began = time.perf_counter()
                result = future.result()  # re-raises a reader's error in the consumer, in order
                yield item, result, time.perf_counter() - began
        finally:  # the consumer stopped (end of training, an error): drop what was read ahead
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)


_END = object()
