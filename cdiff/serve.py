"""One server for every adapter: the base loaded once, and any of its named adapters, or a weighted mix of
them, chosen per request (as LoRAX serves many adapters on one base).

`AdapterServer` holds the base's weights unchanged. A request that names an adapter (or a mix) gets a merged
copy of the base for it, built once and kept in a small LRU cache, so the next request for it pays nothing and
a swap never reloads the base from disk. Sampling runs outside the cache's lock: requests for different
adapters draw at once. `serve` puts it behind HTTP on loopback (stdlib only):

    POST /sample  {"adapter": "digits" | {"digits": 0.7, "letters": 0.5} | null, "class": "3", "n": 2, "seed": 0}
              ->  {"adapter": ..., "class": "3", "class_id": 3, "images": [n PNGs in base64]}
    GET  /adapters -> {"adapters": [names], "sampler": "..."}

A request the server cannot answer (an unknown adapter or class, n or seed out of range, a weight that is not
a finite number) gets HTTP 400 with {"error": one line}. The images of an adapter at weight 1 are exactly those
`cdiff sample BASE --adapter DIR --class C --n N --seed S` draws with the same sampler.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from cdiff.errors import CdiffError, shown
from cdiff.samplers import Sampler

MAX_IMAGES = 256  # per request, as `cdiff sample --n`


class AdapterServer:
    """The base model (loaded once) and named adapters of it; `draw` answers one request."""

    def __init__(self, base: str | Path, adapters: dict[str, str | Path], sampler: Sampler, cache: int = 16):
        from cdiff.adapter_format import check_base, parse_adapter_config, read_adapter
        from cdiff.checkpoint import load_model
        from cdiff.sources import resolve

        if cache < 1:
            raise CdiffError(f"the adapter cache must hold at least 1 model, got {cache}")
        self.base, self.schedule, _ = load_model(base)
        self.base.eval()
        self.sampler, self.cache_size = sampler, cache
        self.adapters: dict[str, Path] = {}
        for name, source in adapters.items():  # every adapter checked against the base now, not at its request
            path = resolve(source, "adapter")
            tensors, config = read_adapter(path)
            check_base(self.base, parse_adapter_config(config, path), path)
            self.adapters[name] = path
        self._models: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self._lock = threading.Lock()
        self.swaps, self.swap_seconds = 0, 0.0  # merged copies built, and the time they took

    def model_for(self, mix: tuple[tuple[str, float], ...]) -> torch.nn.Module:
        """The base with this mix of named adapters merged in (the base itself for none): cached."""
        if not mix:
            return self.base
        with self._lock:
            if mix in self._models:
                self._models.move_to_end(mix)
                return self._models[mix]
            start = time.perf_counter()
            model = copy.deepcopy(self.base)
            if len(mix) == 1 and mix[0][1] == 1.0:  # one adapter at weight 1: as `cdiff sample --adapter` merges it
                from cdiff.adapter_format import load_adapter
                from cdiff.lora import merge_lora

                load_adapter(model, self.adapters[mix[0][0]])
                merge_lora(model)
            else:
                from cdiff.mixing import load_adapters

                load_adapters(model, [(self.adapters[name], weight) for name, weight in mix])
            self._models[mix] = model.eval()
            while len(self._models) > self.cache_size:
                self._models.popitem(last=False)
            self.swaps += 1
            self.swap_seconds += time.perf_counter() - start
            return model

    def mix(self, adapter) -> tuple[tuple[str, float], ...]:
        """A request's `adapter` (None, a name, or {name: weight}) as a sorted tuple of (name, weight)."""
        if adapter is None:
            return ()
        pairs = [(adapter, 1.0)] if isinstance(adapter, str) else adapter.items() if isinstance(adapter, dict) else None
        if pairs is None:
            raise CdiffError(f"adapter must be a name, a {{name: weight}} mapping or null, got {shown(adapter)}")
        out = []
        for name, weight in pairs:
            if name not in self.adapters:
                raise CdiffError(
                    f"unknown adapter {shown(name)} (this server has {', '.join(self.adapters) or 'none'})"
                )
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise CdiffError(f"the weight of adapter {name!r} must be a finite number, got {shown(weight)}")
            out.append((name, float(weight)))
        if not out:
            raise CdiffError("an adapter mix needs at least one adapter")
        return tuple(sorted(out))

    def draw(self, request: dict) -> dict:
        """One request: {"adapter", "class", "n", "seed"} -> {"adapter", "class", "class_id", "images"}."""
        from cdiff.grid import to_uint8
        from cdiff.samplers import sample

        if not isinstance(request, dict):
            raise CdiffError("a request is a JSON object with class, n and seed (and adapter)")
        unknown = set(request) - {"adapter", "class", "n", "seed"}
        if unknown:
            raise CdiffError(f"unknown request fields: {', '.join(sorted(map(str, unknown)))}")
        n, seed = request.get("n", 1), request.get("seed", 0)
        for key, value, top in (("n", n, MAX_IMAGES), ("seed", seed, 2**32 - 1)):
            low = 1 if key == "n" else 0
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
                raise CdiffError(f"{key} must be an integer in [{low}, {top}], got {shown(value)}")
        if "class" not in request:
            raise CdiffError("a request needs a class (a name or an id)")
        mix = self.mix(request.get("adapter"))
        model = self.model_for(mix)
        [class_id] = model.prompt.class_ids([str(request["class"])])
        with torch.inference_mode():
            images = sample(model, self.schedule, [class_id] * n, self.sampler, seed=seed, progress=False)
        return {
            "adapter": {name: weight for name, weight in mix} or None,
            "class": model.class_names[class_id],
            "class_id": class_id,
            "images": [png_base64(p) for p in to_uint8(images)],
        }


def png_base64(pixels) -> str:
    """(H, W, C) uint8 -> a lossless PNG in base64 (grey for one channel)."""
    from PIL import Image

    array = pixels.numpy()
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def http_server(server: AdapterServer, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server (a thread per request) for `server`; call serve_forever() on it, shutdown() to stop."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path != "/adapters":
                return self._reply(404, {"error": "GET /adapters or POST /sample"})
            self._reply(200, {"adapters": sorted(server.adapters), "sampler": str(server.sampler)})

        def do_POST(self):  # noqa: N802
            if self.path != "/sample":
                return self._reply(404, {"error": "POST /sample"})
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= 1 << 20:
                    raise CdiffError("a request body of 1 byte to 1 MiB is needed")
                request = json.loads(self.rfile.read(length))
                self._reply(200, server.draw(request))
            except (CdiffError, ValueError) as e:  # a JSON error is a ValueError
                self._reply(400, {"error": str(e).splitlines()[0] if str(e) else type(e).__name__})

        def log_message(self, *args) -> None:  # a quiet console: no line per request
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    return httpd
