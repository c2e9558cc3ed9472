"""One server for every adapter: the base loaded once, an adapter or a weighted mix per request, over HTTP."""

import base64
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from threading import Thread

import numpy as np
import pytest
import torch
from PIL import Image

from cdiff.adapter_format import load_adapter, save_adapter
from cdiff.checkpoint import load_model, save_model
from cdiff.config import DiffusionConfig
from cdiff.errors import CdiffError
from cdiff.grid import to_uint8
from cdiff.lora import inject_lora, merge_lora, unload_lora
from cdiff.mixing import load_adapters
from cdiff.model import UNet
from cdiff.samplers import Sampler, sample
from cdiff.serve import AdapterServer, http_server
from tests.conftest import tiny_config
from tests.test_lora import _randomize_lora

SAMPLER = Sampler("ddim", 4, guidance_scale=2.0)


@pytest.fixture
def folders(tmp_path):
    """A tiny base model folder, two adapters of it (their own class names) and one of another base."""
    torch.manual_seed(0)
    model = UNet(tiny_config(), ["cat", "dog", "bird"])
    save_model(model, DiffusionConfig(timesteps=50), tmp_path / "base")
    for i, name in enumerate(("a", "b")):
        inject_lora(model, r=2, alpha=4, extra_trainable=["prompt"])
        _randomize_lora(model, seed=i)
        save_adapter(model, tmp_path / name, class_names=[f"{name}{k}" for k in range(3)])
        unload_lora(model)
    torch.manual_seed(1)
    other = UNet(tiny_config(), ["cat", "dog", "bird"])
    save_model(other, DiffusionConfig(timesteps=50), tmp_path / "other-base")
    inject_lora(other, r=2, alpha=4)
    save_adapter(other, tmp_path / "foreign")
    return tmp_path


def _expected(folders, adapters: list[tuple[str, float]], class_id: int, n: int, seed: int) -> torch.Tensor:
    """The pixels `cdiff sample` draws: a fresh load of the base, the adapter(s) merged, the same sampler."""
    model, schedule, _ = load_model(folders / "base")
    if len(adapters) == 1 and adapters[0][1] == 1.0:
        load_adapter(model, folders / adapters[0][0])
        merge_lora(model)
    elif adapters:
        load_adapters(model, [(folders / name, w) for name, w in adapters])
    with torch.inference_mode():
        return to_uint8(sample(model.eval(), schedule, [class_id] * n, SAMPLER, seed=seed, progress=False))


def _pixels(images: list[str]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(s))))) for s in images])


def test_each_request_gets_its_adapter_mix_or_the_base_exactly(folders):
    server = AdapterServer(folders / "base", {"a": folders / "a", "b": folders / "b"}, SAMPLER, cache=2)
    # a, b, a again (from the cache), a mix, the base alone: each exactly what a fresh load draws
    for adapter, want in [
        ("a", [("a", 1.0)]),
        ("b", [("b", 1.0)]),
        ("a", [("a", 1.0)]),
        ({"a": 0.7, "b": 0.5}, [("a", 0.7), ("b", 0.5)]),
        (None, []),
    ]:
        got = server.draw({"adapter": adapter, "class": "1", "n": 2, "seed": 5})
        assert torch.equal(_pixels(got["images"])[..., None], _expected(folders, want, 1, 2, 5)), adapter
        assert got["class"] == (f"{want[0][0]}1" if want else "dog")
    assert server.swaps == 3  # a, b and the mix merged once each; the second a came from the cache
    first = server.draw({"adapter": "a", "class": "0", "n": 1, "seed": 0})["images"]
    assert first != server.draw({"adapter": "b", "class": "0", "n": 1, "seed": 0})["images"]
    for name, param in server.base.named_parameters():  # the base itself never changed
        assert torch.equal(param, dict(load_model(folders / "base")[0].named_parameters())[name]), name


def test_requests_it_cannot_answer_are_refused_in_one_line(folders):
    server = AdapterServer(folders / "base", {"a": folders / "a"}, SAMPLER)
    for request, message in [
        ({"adapter": "zz", "class": "0"}, "unknown adapter 'zz'"),
        ({"adapter": {"a": float("nan")}, "class": "0"}, "must be a finite number"),
        ({"adapter": {"a": True}, "class": "0"}, "must be a finite number"),
        ({"adapter": {}, "class": "0"}, "at least one adapter"),
        ({"adapter": "a", "class": "horse"}, "unknown class 'horse'"),
        ({"adapter": "a", "class": "0", "n": 0}, "n must be an integer in [1, 256]"),
        ({"adapter": "a", "class": "0", "n": 257}, "n must be an integer in [1, 256]"),
        ({"adapter": "a", "class": "0", "seed": -1}, "seed must be an integer"),
        ({"adapter": "a", "class": "0", "seed": 2**32}, "seed must be an integer"),
        ({"adapter": "a"}, "needs a class"),
        ({"adapter": "a", "class": "0", "steps": 3}, "unknown request fields: steps"),
        (["a"], "a request is a JSON object"),
    ]:
        with pytest.raises(CdiffError, match=message.replace("[", r"\[").replace("]", r"\]")):
            server.draw(request)
    with pytest.raises(CdiffError, match="trained on other base weights|another base|other base"):
        AdapterServer(folders / "base", {"f": folders / "foreign"}, SAMPLER)


def test_http_serves_concurrent_clients_each_their_own_adapter(folders):
    server = AdapterServer(folders / "base", {"a": folders / "a", "b": folders / "b"}, SAMPLER, cache=1)
    httpd = http_server(server, "127.0.0.1", 0)
    Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"

    def post(body) -> tuple[int, dict]:
        request = urllib.request.Request(f"{url}/sample", json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        with urllib.request.urlopen(f"{url}/adapters", timeout=10) as reply:
            assert json.loads(reply.read())["adapters"] == ["a", "b"]
        jobs = [{"adapter": "ab"[k % 2], "class": str(k % 3), "n": 1, "seed": k} for k in range(8)]
        with ThreadPoolExecutor(8) as pool:  # 8 clients at once, alternating adapters through a cache of one
            replies = list(pool.map(post, jobs))
        for job, (status, body) in zip(jobs, replies, strict=True):
            assert status == 200, body
            want = _expected(folders, [(job["adapter"], 1.0)], int(job["class"]), 1, job["seed"])
            assert torch.equal(_pixels(body["images"])[..., None], want), job
        status, body = post({"adapter": "nope", "class": "0"})
        assert status == 400 and body["error"].startswith("unknown adapter 'nope'") and "\n" not in body["error"]
    finally:
        httpd.shutdown()
        httpd.server_close()
