"""The worker's side of the protocol: decode a request (``ops``), call the engine, encode the reply."""

from __future__ import annotations

from typing import Any, BinaryIO, ClassVar

from . import ipc
from .ipc import Arrays, Header
from .ops import OPS, Op, call_args, decode, encode
from .protocol import Engine


class WorkerServer:
    """Answers the requests of ``ops.OPS`` by calling the engine method of the same name."""

    ops: ClassVar[dict[str, Op]] = OPS

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, op: Op, args: Any) -> Any:
        return getattr(self.engine, op.name)(**call_args(args))

    def handle(self, header: Header, arrays: Arrays) -> tuple[Header, Arrays]:
        op = self.ops.get(str(header.get("op")))
        if op is None:
            return {"error": f"unknown worker op {header.get('op')!r}"}, {}
        try:
            result = self.run(op, decode(op.args, header, arrays))
            return encode(op.reply, result)
        except Exception as e:  # reported to the client, which raises EngineError
            return {"error": f"{type(e).__name__}: {e}"}, {}

    def serve(self, inp: BinaryIO, out: BinaryIO) -> None:
        while True:
            try:
                header, arrays = ipc.recv(inp)
            except ipc.ChannelClosed:
                break
            if header.get("op") == "exit":
                break
            reply, reply_arrays = self.handle(header, arrays)
            del arrays
            ipc.send(out, reply, reply_arrays)
