"""`amphibia worker`: one model, one batching context, dialling the gateway over WebSocket.

Workers dial out, so they can sit on other machines or behind NAT. The batcher owns the model and
runs on the process's main thread (llama.cpp's OpenMP decode is ~35% slower from any other thread,
measured); the WebSocket session runs on an asyncio loop in a second thread, moves messages
between the socket and the batcher, and reconnects with backoff.
"""
from __future__ import annotations

import asyncio
import logging
import platform
import random
import threading
import uuid
from dataclasses import dataclass

import websockets

from ... import __version__
from ...config import ModelSpec
from ..llama_model import LlamaModel
from ...errors import LLMError
from . import wire
from .batcher import Batcher
from .jobs import failed_message

log = logging.getLogger("amphibia.worker")


@dataclass
class WorkerOptions:
    gateway: str  # ws://host:port/pool
    token: str
    model: ModelSpec
    slots: int = 4
    worker_id: str = ""
    max_backoff_s: float = 10.0


def device_name(gpu_layers: int) -> str:
    import llama_cpp

    if gpu_layers and llama_cpp.llama_supports_gpu_offload():
        return f"gpu ({gpu_layers} layers)"
    return f"cpu ({platform.machine()})"


def run(opts: WorkerOptions) -> None:
    """Serve until interrupted: the batcher on this (main) thread, the network on another."""
    spec = opts.model
    model = LlamaModel(spec.gguf_path(), spec.n_ctx, spec.gpu_layers, spec.threads, opts.slots, spec.flash_attn,
                       embeddings_only=spec.purpose == "embeddings")
    loop = asyncio.new_event_loop()
    outbox: asyncio.Queue[wire.Message] = asyncio.Queue()
    batcher = Batcher(model, lambda m: loop.call_soon_threadsafe(outbox.put_nowait, m), coalesce=True)

    def network() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(connect_forever(opts, batcher, outbox))
        finally:
            batcher.submit(None)

    threading.Thread(target=network, name="worker-net", daemon=True).start()
    try:
        batcher.run()
    finally:
        model.close()


async def connect_forever(opts: WorkerOptions, batcher: Batcher, outbox: asyncio.Queue,
                          stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    worker_id = opts.worker_id or f"w-{uuid.uuid4().hex[:8]}"
    spec = opts.model
    hello = wire.Hello(worker_id=worker_id, token=opts.token, models=[spec.name], slots=opts.slots,
                       device=device_name(spec.gpu_layers), version=__version__)
    backoff = 0.2
    while not stop.is_set():
        try:
            async with websockets.connect(opts.gateway, max_size=wire.MAX_FRAME_BYTES, open_timeout=10) as ws:
                await ws.send(hello.encode())
                welcome = wire.decode(await asyncio.wait_for(ws.recv(), 10), (wire.Welcome,))
                assert isinstance(welcome, wire.Welcome)
                log.info("worker %s joined %s (%s, %d slots)", worker_id, opts.gateway, spec.name, opts.slots)
                backoff = 0.2
                await _session(ws, batcher, outbox, welcome.heartbeat_s, stop)
        except (OSError, asyncio.TimeoutError, websockets.WebSocketException, wire.ProtocolError) as exc:
            log.warning("worker %s: gateway %s unavailable (%s); retrying in %.1f s", worker_id, opts.gateway,
                        exc, backoff)
        batcher.drop_all()  # the gateway re-places whatever this worker had
        while not outbox.empty():
            outbox.get_nowait()
        if stop.is_set():
            break
        try:
            await asyncio.wait_for(stop.wait(), backoff * (1 + random.random() / 4))
        except asyncio.TimeoutError:
            pass
        backoff = min(opts.max_backoff_s, backoff * 2)


def _frames(msg: wire.Message) -> list[str]:
    """`msg` as frames within the limit; an answer too large to send fails its request instead of
    the connection (the gateway would close a worker that sends an oversized frame). A step's
    `tokens` too large for one frame goes as a `token` frame per piece."""
    frame = msg.encode()
    size = wire.frame_bytes(frame)
    if size > wire.MAX_FRAME_BYTES and isinstance(msg, wire.Tokens):
        return [f for piece in msg.split() for f in _frames(piece)]
    if size > wire.MAX_FRAME_BYTES and isinstance(msg, (wire.Result, wire.Token)):
        error = LLMError(f"the answer is {size} bytes, over the pool's frame limit of {wire.MAX_FRAME_BYTES}")
        frame = failed_message(msg.id, error).encode()
    return [frame]


async def _session(ws: websockets.ClientConnection, batcher: Batcher, outbox: asyncio.Queue,
                   heartbeat_s: float, stop: asyncio.Event) -> None:
    async def send() -> None:
        while True:
            for frame in _frames(await outbox.get()):
                await ws.send(frame)

    async def beat() -> None:
        while True:
            await asyncio.sleep(heartbeat_s)
            await outbox.put(wire.Heartbeat(jobs=list(batcher.held)))

    async def receive() -> None:
        async for frame in ws:
            batcher.submit(wire.decode(frame, wire.GATEWAY_TO_WORKER))

    tasks = [asyncio.create_task(c) for c in (send(), beat(), receive(), stop.wait())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.exception() and not isinstance(task.exception(), websockets.ConnectionClosed):
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
