"""A headless client that speaks viser's websocket protocol, for tests and benchmarks.

viser ships no test client, and its wire format changes between minor versions, so every
use of its private API (``viser._messages``, the frame layout, GUI uuids) lives here: a viser
upgrade breaks this one module. Checked against viser 1.1.1:

* connect with subprotocol ``viser-v{viser.__version__}`` (a mismatch is closed with 1002);
* client -> server: ``msgpack(message.as_serializable_dict())``;
* server -> client: ``[u64 msgpack size][u64 zstd size][zstd(msgpack{"messages", ...})]``
  followed by 8-byte-aligned raw array buffers (not needed for images, which travel as bytes).
"""

from __future__ import annotations

import collections
import io
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from fieldkit.viewer.camera import ViewCamera


def decode_frame(frame: bytes) -> list[dict[str, Any]]:
    """The messages in one server -> client websocket frame, as dicts with a ``type`` key."""
    import msgspec
    import zstandard

    inner_size = int.from_bytes(frame[0:8], "little")
    compressed_size = int.from_bytes(frame[8:16], "little")
    inner = zstandard.ZstdDecompressor().decompress(frame[16 : 16 + compressed_size], max_output_size=inner_size)
    payload = msgspec.msgpack.decode(inner)
    return list(payload.get("messages", ()))


@dataclass
class ReceivedImage:
    format: str
    image: np.ndarray  # uint8 [H,W,3]
    received_at: float


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB"))


class ViserTestClient:
    """Connects to a viser server on 127.0.0.1 and plays the part of a browser tab."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        import viser
        from websockets.sync.client import connect

        self.url = f"ws://{host}:{port}"
        self.ws = connect(
            self.url,
            subprotocols=[f"viser-v{viser.__version__}"],
            max_size=None,
            open_timeout=timeout,
            close_timeout=1.0,
            ping_interval=None,  # a test that is busy elsewhere must not time out the connection
            compression=None,
        )
        self.messages: list[dict[str, Any]] = []  # everything received
        self._pending: collections.deque[dict[str, Any]] = collections.deque()  # not yet seen by wait_for

    # -- sending -----------------------------------------------------------------------------------

    def send_message(self, message) -> None:
        import msgspec

        self.ws.send(msgspec.msgpack.encode(message.as_serializable_dict()))

    def send_raw(self, data: bytes | str) -> None:
        """Anything at all (for robustness tests)."""
        self.ws.send(data)

    def send_camera(self, view: ViewCamera, near: float = 0.01, far: float = 1000.0, look_at=None, up=(0.0, 0.0, 1.0)) -> None:
        from viser import _messages

        if look_at is None:  # a point on the optical axis
            from fieldkit.cameras import quat_to_rotmat
            import torch

            forward = quat_to_rotmat(torch.tensor(view.wxyz, dtype=torch.float64))[:, 2].numpy()
            look_at = tuple(float(v) for v in np.asarray(view.position) + forward)
        self.send_message(
            _messages.ViewerCameraMessage(
                wxyz=tuple(view.wxyz),
                position=tuple(view.position),
                fov=float(view.fov),
                near=near,
                far=far,
                image_height=int(view.height),
                image_width=int(view.width),
                look_at=tuple(look_at),
                up_direction=tuple(up),
            )
        )

    def send_gui_value(self, uuid: str, value: Any) -> None:
        from viser import _messages

        self.send_message(_messages.GuiUpdateMessage(uuid=uuid, updates={"value": value}))

    def click_button(self, uuid: str) -> None:
        self.send_gui_value(uuid, True)

    # -- receiving ---------------------------------------------------------------------------------

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        """Messages that arrive within ``timeout`` seconds (at least one frame's worth if any)."""
        from websockets.exceptions import ConnectionClosed

        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                frame = self.ws.recv(timeout=remaining)
            except TimeoutError:
                break
            except ConnectionClosed:
                break
            if isinstance(frame, bytes):
                got.extend(decode_frame(frame))
        self.messages.extend(got)
        self._pending.extend(got)
        return got

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The next message (in arrival order, none skipped between calls) for which ``predicate`` holds."""
        from websockets.exceptions import ConnectionClosed

        deadline = time.monotonic() + timeout
        while True:
            while self._pending:
                message = self._pending.popleft()
                if predicate(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                frame = self.ws.recv(timeout=remaining)
            except (TimeoutError, ConnectionClosed):
                return None
            if isinstance(frame, bytes):
                messages = decode_frame(frame)
                self.messages.extend(messages)
                self._pending.extend(messages)

    def wait_for_image(self, timeout: float, size: tuple[int, int] | None = None, fmt: str | None = None) -> ReceivedImage | None:
        """Next background image (optionally of ``size`` = (width, height) and format)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            message = self.wait_for(lambda m: m.get("type") == "BackgroundImageMessage" and m.get("rgb_data"), remaining)
            if message is None:
                return None
            image = decode_image(message["rgb_data"])
            if size is not None and (image.shape[1], image.shape[0]) != tuple(size):
                continue
            if fmt is not None and message.get("format") != fmt:
                continue
            return ReceivedImage(message["format"], image, time.monotonic())

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass

    def __enter__(self) -> "ViserTestClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gui_uuid(handle) -> str:
    """The wire id of a viser GUI handle (private API, kept in this module)."""
    return handle._impl.uuid
