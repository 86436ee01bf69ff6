"""Branch lanes: the independent branches of an HRNet stage run on CUDA streams of their own.

Between two fuse steps HRNet's branches share nothing: branch k's residual blocks read only
branch k's tensors. Run one after another, each of their convs is a small kernel that leaves most of
the GPU idle (w18 at 1024x2048 on an H200: 10-20 us per 3x3 conv at 8-16% of the copy or matmul
ceiling), and the lower-resolution branches' kernels fill even fewer multiprocessors. Lane k is a
stream for everything branch k computes; a CUDA graph captured over the lanes keeps them as
parallel paths, so the replay runs the branches side by side.

Rules the engine follows (``hrnet_fast/engine.py``):

* Lane 0 is the caller's current stream (or one of its own, see :class:`LanePool`); the lanes
  fork from the caller's stream at the start of a forward (:meth:`Lanes.fork`) and join it at
  the end (:meth:`Lanes.join`), so a captured graph has no unjoined work and the output is
  ready on the caller's stream. Steps outside any branch (stem, layer1, heads) run on lane 0.
* An op runs on the lane of the branch it reads, also when it writes for another branch (a fuse
  step's strided and 1x1 contributions, a transition to a new branch, a head projection): what
  crosses lanes is then a small result, strided or still at its source's resolution (the fuse
  and head kernels resize as they read).
* A tensor handed to another lane crosses with :meth:`Lanes.deliver`: the receiving lane waits for
  an event recorded right after the producer's work (:meth:`Lanes.mark`), placed just before the
  receiver's use, and ``record_stream`` keeps the caching allocator from giving the memory to the
  producer's stream while the receiver may still read it.

The arithmetic is the same operations on the same inputs, so the results equal a serial run's
(the tests compare them exactly). :data:`SERIAL` is the do-nothing form for the CPU, compiled and
traced forwards.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional

import torch


class SerialLanes:
    """Every lane is the current stream: nothing to fork, mark, wait for or join."""

    def fork(self) -> None:
        pass

    def on(self, lane: int):
        return contextlib.nullcontext()

    def mark(self, lane: int) -> None:
        return None

    def deliver(self, lane: int, tensors: Iterable[torch.Tensor],
                ready: Dict[int, Optional[object]]) -> None:
        pass

    def join(self) -> None:
        pass


SERIAL = SerialLanes()


class Lanes(SerialLanes):
    """Lanes for one forward: ``lanes[k]`` is lane k's stream; ``origin`` is the caller's current
    stream at construction (the capture stream inside a CUDA-graph capture), which is lane 0
    unless lane 0 has a stream of its own (:class:`LanePool`'s ``priority_first``)."""

    def __init__(self, lanes: "list[torch.cuda.Stream]", origin: "torch.cuda.Stream") -> None:
        self.streams, self.origin = list(lanes), origin

    def fork(self) -> None:
        """Each lane starts after the work already queued on the caller's stream (the input).
        Inside a capture this also brings every lane into the graph before it gets work."""
        for s in self.streams:
            if s != self.origin:
                s.wait_stream(self.origin)

    def on(self, lane: int):
        return torch.cuda.stream(self.streams[lane])

    def mark(self, lane: int) -> "torch.cuda.Event":
        """An event after everything queued on ``lane`` so far."""
        return self.streams[lane].record_event()

    def deliver(self, lane: int, tensors: Iterable[torch.Tensor],
                ready: Dict[int, Optional[object]]) -> None:
        """Hand ``tensors`` (produced on the lanes ``ready`` names, each with the event marked
        after its production) to ``lane``: ``lane`` waits for those events from here on, and the
        tensors' memory stays theirs until ``lane``'s use of them has run."""
        stream = self.streams[lane]
        for src, event in ready.items():
            if src != lane and event is not None:
                stream.wait_event(event)
        for t in tensors:
            t.record_stream(stream)

    def join(self) -> None:
        """The caller's stream waits for every lane (a capture must end with all work joined)."""
        for s in self.streams:
            if s != self.origin:
                self.origin.wait_stream(s)


class LanePool:
    """The streams of one engine per device, created once (creating a stream per forward would
    cost a driver call each time, and a graph captures whichever streams it ran on).
    ``priority_first`` (the engine's choice) gives lane 0 (branch 0, the longest chain of each
    module) a stream of its own at torch's high priority, so its kernels are scheduled ahead of the
    other lanes' (H200, fp16, 1x3x1024x2048 graph replays: w18 1.011x, w48 1.036x over lanes of
    one priority; the same outputs bit for bit)."""

    def __init__(self, priority_first: bool = False) -> None:
        self.priority_first = priority_first
        self._streams: Dict[torch.device, list] = {}

    def lanes(self, device: torch.device, count: int) -> Lanes:
        streams = self._streams.get(device)
        if streams is None or len(streams) < count:
            first = None
            if self.priority_first:
                first = torch.cuda.Stream(device=device, priority=-1)  # torch's "high"
            streams = self._streams[device] = [first] + [torch.cuda.Stream(device=device)
                                                         for _ in range(count - 1)]
        origin = torch.cuda.current_stream(device)
        lanes = [streams[0] or origin] + streams[1:count]
        return Lanes(lanes, origin)
