"""Decoder layers read from the model file into a ring of pinned buffers, ahead of their use.

When host memory cannot hold the model (`--host-ram`), lowtune.streaming leaves some streamed
layers in the GGUF file: before such a layer is copied to the GPU, its bytes are read from the
file into one buffer of a small ring of (pinned) host buffers, by a thread that reads ahead in
the order the layers will be asked for. A buffer is refilled only once the copy out of it has
completed (the CUDA event the consumer hands back). What the reads bring into the page cache is
dropped again (posix_fadvise), so the file's pages do not stay in host memory either; host memory
holds the ring, whatever the size of the model.

    ring = DiskRing(path, ranges, n_buffers=3, pin=True)  # {layer: [(file offset, bytes, pack offset)]}
    buf = ring.get(layer, direction)    # the layer's pack (blocks until it is read): a uint8 tensor
    ... copy buf to the GPU, record `event` ...
    ring.release(layer, event)          # refilled once `event` has completed (None: at once)
    ring.stats()                        # bytes read, seconds reading, GB/s, waits, mispredictions
    ring.close()

Order. Layers are asked for in forward order (+1) and then in backward order (-1), step after
step; the ring predicts that bounce: after the last layer going up come the layers going down,
and after the first going down those going up. `skip` drops the layers a turn does not ask for
again (the GPU slots still hold them). A layer asked for out of the predicted order costs the
reads ahead (they are dropped) and restarts the prediction from it: never a wrong layer.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch


def read_ranges(fd: int, ranges, view, drop_cache: bool = True, path: str = "the model file") -> None:
    """Read [(file offset, bytes, offset in view)] from file descriptor `fd` into `view` (a
    writable uint8 NumPy array), then drop those pages from the page cache."""
    drop = drop_cache and hasattr(os, "posix_fadvise")
    for offset, nbytes, dst in ranges:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [memoryview(view[dst + done:dst + nbytes])], offset + done)
            if got <= 0:
                raise OSError(f"{path}: reading stopped at byte {offset + done} of {offset + nbytes} "
                              "(the file was truncated or changed while training)")
            done += got
        if drop:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


@dataclass
class DiskLayers:
    """Layers a lowtune.streaming.LayerStreamer reads from the model file: the file, which
    layers, and where each streamed layer's bytes are ({layer: [(file offset, bytes, pack
    offset)]}; the streamed layers kept in host memory are read from the file too)."""
    path: str
    layers: list[int]
    ranges: dict[int, list[tuple[int, int, int]]]
    n_buffers: int = 3

    def ring(self, streamed: list[int], pin: bool, n_slots: int = 2) -> "DiskRing":
        """The ring for these layers, its prediction told which layers a turn finds still in the
        GPU slots: the last `n_slots` streamed layers at the turn to backward, the first ones at
        the turn to the next step's forward."""
        ordered, disk = sorted(streamed), sorted(self.layers)
        skip = {(disk[-1], -1): len(set(ordered[-n_slots:]) & set(disk)),
                (disk[0], +1): len(set(ordered[:n_slots]) & set(disk))}
        return DiskRing(self.path, {i: self.ranges[i] for i in disk}, self.n_buffers, pin=pin, skip=skip)


class DiskRing:
    """See the module docstring. `ranges`: for each layer, where its bytes are in the file and
    where they go in its pack; `skip`: {(layer, direction): layers to pass over} at the turns."""

    def __init__(self, path, ranges: dict[int, list[tuple[int, int, int]]], n_buffers: int = 3,
                 pin: bool = False, skip: dict | None = None, drop_cache: bool = True):
        if n_buffers < 1:
            raise ValueError(f"a disk ring needs at least one buffer, got {n_buffers}")
        if not ranges:
            raise ValueError("a disk ring needs at least one layer")
        self.path = os.fspath(path)
        self.ranges = {int(i): list(r) for i, r in ranges.items()}
        self.order = sorted(self.ranges)
        self.pack_bytes = {i: max((off + n for _, n, off in r), default=0) for i, r in self.ranges.items()}
        self.fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        end = max(o + n for r in self.ranges.values() for o, n, _ in r)
        if end > size:
            os.close(self.fd)
            raise ValueError(f"{self.path} is truncated: its layers need {end} bytes, the file has {size}")
        self.skip = dict(skip or {})
        self.drop_cache = drop_cache and hasattr(os, "posix_fadvise")
        biggest = max(self.pack_bytes.values())
        self.buffers = [torch.empty(biggest, dtype=torch.uint8, pin_memory=pin) for _ in range(n_buffers)]
        self._views = [b.numpy() for b in self.buffers]
        self._free = deque(range(n_buffers))
        self._guard = [None] * n_buffers       # event: the last copy out of the buffer
        self._queue: deque[_Entry] = deque()   # predicted reads, oldest first
        self._held: dict[int, _Entry] = {}     # handed out by get(), not yet released
        self._cursor = None                    # (layer, direction) the prediction goes on from
        self._cond = threading.Condition()
        self._closed = False
        self.bytes_read = 0
        self.read_s = 0.0
        self.wait_s = 0.0
        self.reads = 0
        self.mispredictions = 0
        self.max_busy = 0                      # most buffers queued or held at once
        self._thread = threading.Thread(target=self._run, name="lowtune-disk-ring", daemon=True)
        self._thread.start()

    # -- prediction -------------------------------------------------------------------------------

    def _after(self, layer: int, direction: int) -> tuple[int, int]:
        """The (layer, direction) asked for after `layer` going `direction`: the next in order,
        or the bounce at either end, passing over what the turn skips."""
        k = self.order.index(layer) + direction
        if 0 <= k < len(self.order):
            return self.order[k], direction
        direction = -direction
        k = self.order.index(layer)
        k += self.skip.get((layer, direction), 0) * direction
        k = min(max(k, 0), len(self.order) - 1)
        return self.order[k], direction

    # -- the reader thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._free or self._cursor is None):
                    self._cond.wait()
                if self._closed:
                    return
                buf = self._free.popleft()
                layer, direction = self._cursor
                entry = _Entry(layer, direction, buf)
                self._queue.append(entry)
                self.max_busy = max(self.max_busy, len(self._queue) + len(self._held))
                self._cursor = self._after(layer, direction)
                guard, self._guard[buf] = self._guard[buf], None
            try:
                if guard is not None:
                    guard.synchronize()        # the copy out of this buffer has completed
                t0 = time.perf_counter()
                self._read(layer, self._views[buf])
                dt = time.perf_counter() - t0
                error = None
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                dt, error = 0.0, e
            with self._cond:
                entry.error = error
                entry.ready = True
                self.read_s += dt
                if error is None:
                    self.bytes_read += self.pack_bytes[layer]
                    self.reads += 1
                if entry.dropped:
                    self._free.append(buf)
                self._cond.notify_all()

    def _read(self, layer: int, view) -> None:
        read_ranges(self.fd, self.ranges[layer], view, self.drop_cache, self.path)

    # -- the consumer --------------------------------------------------------------------------------

    def get(self, layer: int, direction: int = 1) -> torch.Tensor:
        """Layer `layer`'s pack (its first pack_bytes[layer] bytes of a ring buffer), read; the
        reads ahead continue from it in `direction`. Blocks until it is read."""
        if layer not in self.ranges:
            raise KeyError(f"layer {layer} is not read from {self.path}")
        t0 = time.perf_counter()
        with self._cond:
            if layer in self._held:
                raise RuntimeError(f"layer {layer} is held already (release it first)")
            while True:
                found = next((e for e in self._queue if e.layer == layer and not e.dropped), None)
                if found is not None:
                    break
                if self._cursor is not None and self._cursor[0] == layer:
                    # predicted next, not queued yet (every buffer is busy, or the reader has not
                    # run): what is queued before it is passed over
                    self._drop(list(self._queue))
                else:
                    # not predicted: drop the reads ahead and start again from this layer
                    if self._queue or self._cursor is not None:
                        self.mispredictions += 1
                    self._drop(list(self._queue))
                    self._cursor = (layer, direction)
                    self._cond.notify_all()
                while not any(e.layer == layer and not e.dropped for e in self._queue) and not self._closed:
                    self._cond.wait()
                if self._closed:
                    raise RuntimeError("the disk ring is closed")
            # passed over: what the prediction read before this layer
            self._drop(list(self._queue)[:self._queue.index(found)])
            while not found.ready:
                self._cond.wait()
            self._queue.remove(found)
            if found.error is not None:
                self._free.append(found.buffer)
                self._cond.notify_all()
                raise found.error
            self._held[layer] = found
        self.wait_s += time.perf_counter() - t0
        return self.buffers[found.buffer][:self.pack_bytes[layer]]

    def _drop(self, entries) -> None:
        """Drop predicted reads (with the lock held): their buffers are free once read."""
        for e in entries:
            e.dropped = True
            if e in self._queue:
                self._queue.remove(e)
            if e.ready:
                self._free.append(e.buffer)
        self._cond.notify_all()

    def release(self, layer: int, event=None) -> None:
        """The consumer is done with `layer`'s buffer once `event` (a CUDA event, or None: now)
        has completed."""
        with self._cond:
            entry = self._held.pop(layer)
            self._guard[entry.buffer] = event
            self._free.append(entry.buffer)
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {"bytes_read": self.bytes_read, "reads": self.reads, "read_s": self.read_s,
                    "read_gb_per_s": self.bytes_read / self.read_s / 1e9 if self.read_s else None,
                    "wait_s": self.wait_s, "mispredictions": self.mispredictions,
                    "buffers": len(self.buffers), "buffer_bytes": self.buffers[0].numel(),
                    "max_busy": self.max_busy}

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        os.close(self.fd)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class _Entry:
    __slots__ = ("layer", "direction", "buffer", "ready", "error", "dropped")

    def __init__(self, layer: int, direction: int, buffer: int):
        self.layer, self.direction, self.buffer = layer, direction, buffer
        self.ready, self.error, self.dropped = False, None, False


__all__ = ["DiskLayers", "DiskRing", "read_ranges"]
