"""One server for every adapter under load: `cdiff serve`'s HTTP server on loopback, 8 concurrent clients.

The default UNet (params.yaml's model) with random weights, and 4 adapters of it (the default targets, random
updates): the timing does not depend on what the weights draw. Each request asks for 1 image (DPM-Solver++(2M),
20 steps, guidance 2). Three runs, side by side on one machine:
  one adapter      every request names the same adapter
  per request      each request names the next of the 4 adapters (all 4 fit the cache: merged once each)
  swap each time   the same, with a cache of one merged model: every request swaps (merges a fresh copy)
For each: requests/s, p50 and p95 latency, the merges made and their mean cost.

    .venv/bin/python bench/serve_adapters.py                  # about 3 minutes on 2 CPU cores
    .venv/bin/python bench/serve_adapters.py --requests 16    # quicker
Prints a table; writes bench/results/serve-adapters.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Thread

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdiff.adapter_format import save_adapter  # noqa: E402
from cdiff.checkpoint import save_model  # noqa: E402
from cdiff.config import DiffusionConfig, LoraConfig, ModelConfig, from_dict, read_yaml  # noqa: E402
from cdiff.io import write_json  # noqa: E402
from cdiff.lora import inject_lora, lora_layers, unload_lora  # noqa: E402
from cdiff.model import UNet  # noqa: E402
from cdiff.samplers import Sampler  # noqa: E402
from cdiff.serve import AdapterServer, http_server  # noqa: E402

CLIENTS, ADAPTERS = 8, 4


def folders(root: Path) -> tuple[Path, dict[str, Path]]:
    raw = read_yaml(Path(__file__).resolve().parents[1] / "params.yaml")
    config = from_dict(ModelConfig, raw["model"], "model")
    torch.manual_seed(0)
    model = UNet(config, [str(k) for k in range(config.num_classes)])
    save_model(model, DiffusionConfig(), root / "base")
    lora = LoraConfig()
    adapters = {}
    for i in range(ADAPTERS):
        inject_lora(model, lora.targets, lora.r, lora.alpha)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in lora_layers(model):
                layer.lora_B.copy_(0.02 * torch.randn(layer.lora_B.shape, generator=g))
        adapters[f"a{i}"] = root / f"a{i}"
        save_adapter(model, adapters[f"a{i}"])
        unload_lora(model)
    return root / "base", adapters


def run(server: AdapterServer, names: list[str], requests: int) -> dict:
    httpd = http_server(server, "127.0.0.1", 0)
    Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/sample"

    def post(k: int) -> float:
        body = json.dumps({"adapter": names[k % len(names)], "class": str(k % 10), "n": 1, "seed": k}).encode()
        start = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=300) as reply:
            reply.read()
        return time.perf_counter() - start

    swaps_before, swap_s_before = server.swaps, server.swap_seconds
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        latencies = sorted(pool.map(post, range(requests)))
    wall = time.perf_counter() - start
    httpd.shutdown()
    httpd.server_close()
    swaps = server.swaps - swaps_before
    return {
        "requests": requests,
        "requests_per_s": requests / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "merges": swaps,
        "merge_ms": 1000 * (server.swap_seconds - swap_s_before) / swaps if swaps else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve-adapters.json"))
    args = parser.parse_args()
    sampler = Sampler("dpm++2m", 20, guidance_scale=2.0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = folders(Path(tmp))
        names = list(adapters)
        warm = AdapterServer(base, adapters, sampler)
        run(warm, names[:1], CLIENTS)  # first requests: imports and allocator warm-up, not measured
        plans = {
            "one adapter": (AdapterServer(base, adapters, sampler, cache=16), names[:1]),
            "per request": (AdapterServer(base, adapters, sampler, cache=16), names),
            "swap each time": (AdapterServer(base, adapters, sampler, cache=1), names),
        }
        print(f"{CLIENTS} clients, {args.requests} requests each run, 1 image per request, {sampler}")
        print(f"{'run':<16}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'merges':>8}{'ms/merge':>10}")
        for name, (server, which) in plans.items():
            row = rows[name] = run(server, which, args.requests)
            print(f"{name:<16}{row['requests_per_s']:>8.2f}{row['p50_s']:>8.2f}{row['p95_s']:>8.2f}"
                  f"{row['merges']:>8}{row['merge_ms']:>10.1f}", flush=True)  # fmt: skip
    result = {"clients": CLIENTS, "adapters": ADAPTERS, "sampler": str(sampler), "rows": rows}
    result["machine"] = platform.processor() or platform.machine()
    result["torch_threads"] = torch.get_num_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)  # atomic; a NaN is refused
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
