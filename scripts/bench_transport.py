"""Measures the two ways a PySyft 0.9.5 datasite can expose actions, side by side.

(a) a data-owner ``sy.api_endpoint``; (b) an approved code request (what fedseg uses).
Both echo a digest of the same payloads through one datasite on loopback, so the
difference is the transport path alone. Writes ``bench_transport.json`` and ``.md``.

    python scripts/bench_transport.py --out runs/bench_transport
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path("runs/bench_transport"))
parser.add_argument("--sizes", type=int, nargs="+", default=[100, 2_000_000, 8_000_000], help="payload bytes")
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)

password = secrets.token_urlsafe(16)
os.environ.update(DEFAULT_ROOT_EMAIL="owner@fedseg.org", DEFAULT_ROOT_PASSWORD=password, SYFT_TEMP_ROOT=str((args.out / "syft").resolve()))

import syft as sy  # noqa: E402 - the environment above must be set first
from syft.service.policy.policy import OutputPolicyExecuteCount  # noqa: E402

from fedseg.node.launcher import free_port  # noqa: E402

port = free_port()
handle = sy.orchestra.launch(name="bench", port=port, host="127.0.0.1", reset=True, n_consumers=1, create_producer=True)
try:
    do = sy.login(url="http://127.0.0.1", port=port, email="owner@fedseg.org", password=password)
    dataset = sy.Dataset(name="site")
    asset = sy.Asset(name="summary", data=np.array([1, 2]))
    asset.no_mock()
    dataset.add_asset(asset)
    do.upload_dataset(dataset)

    @sy.api_endpoint(path="bench.echo", endpoint_timeout=300)
    def echo_endpoint(context, message):  # noqa: ANN001, ANN201 - no annotations: syft resolves them by name
        import hashlib

        return {"frame": hashlib.sha256(message["frame"]).digest()}

    do.custom_api.add(endpoint=echo_endpoint)
    do.register(name="coord", email="coord@fedseg.org", password=password, password_verify=password)
    ds = sy.login(url="http://127.0.0.1", port=port, email="coord@fedseg.org", password=password)
    site = ds.datasets["site"].assets["summary"]

    @sy.syft_function(input_policy=sy.MixedInputPolicy(site=site, message=dict, client=ds), output_policy=OutputPolicyExecuteCount(limit=10**6))
    def echo_code(site, message):  # noqa: ANN001, ANN201
        import hashlib

        return {"frame": hashlib.sha256(message["frame"]).digest()}

    ds.code.request_code_execution(echo_code)
    do.requests[-1].approve()

    results = []
    for size in args.sizes:
        payload = {"frame": np.random.default_rng(0).bytes(size)}
        code_s, endpoint_s = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            pointer = sy.ActionObject.from_obj(payload).send(ds)
            ds.code.echo_code(site=site, message=pointer).get()
            code_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            ds.api.services.bench.echo(message=payload)
            endpoint_s.append(time.perf_counter() - t)
        row = {"bytes": size, "code_request_s": code_s, "endpoint_s": endpoint_s,
               "ratio_endpoint_over_code": statistics.median(endpoint_s) / statistics.median(code_s)}
        print(json.dumps(row))
        results.append(row)
finally:
    handle.land()

commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
(args.out / "bench_transport.json").write_text(json.dumps({"commit": commit, "syft": sy.__version__, "results": results}, indent=2))
lines = ["| payload | code request, median s | api_endpoint, median s | endpoint ÷ code request |", "|---|---|---|---|"]
for r in results:
    lines.append(f"| {r['bytes']:,} B | {statistics.median(r['code_request_s']):.2f} | {statistics.median(r['endpoint_s']):.2f} | {r['ratio_endpoint_over_code']:.1f}x |")
(args.out / "bench_transport.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
