"""Multi-node drill (run by tests/test_multinode.py in a process of its own: it starts its own Ray cluster).

A Ray cluster of four nodes on this machine (`ray.cluster_utils.Cluster`): a head for the ingress, one node
offering `prefill_node` and two offering `decode_node`. pdserve is deployed with `resources` so that the prefill
replica and the two decode replicas land on their nodes, KV on the pairs' sockets (as between machines; on one
machine the shared-memory probe would succeed). Then:
1. every engine replica runs on a node of its own kind (the ingress on the head);
2. greedy replies through the cross-node pairs equal the collocated app's (deployed on the same cluster);
3. one decode node is removed with its replica: requests keep succeeding, on the decode node that is left.
Prints one JSON line with what it saw; exits non-zero on any failure.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _complete(base: str, prompt: list[int], timeline: list) -> dict:
    """One greedy completion; its outcome and seconds go on `timeline`, so a failure shows which request hung."""
    import httpx

    start, outcome = time.monotonic(), "error"
    try:
        response = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "model": "pdserve-tiny-llama", "prompt": prompt, "max_tokens": 16, "temperature": 0})
        outcome = str(response.status_code)
        assert response.status_code == 200, response.text
        return response.json()
    finally:
        timeline.append([base.rsplit("/", 1)[-1], len(prompt), outcome, round(time.monotonic() - start, 2)])


def _nodes_of(app: str, deployment: str) -> list[str]:
    """The Ray nodes the deployment's live replicas run on (their `stats()`)."""
    from ray import serve

    results = serve.get_deployment_handle(deployment, app).broadcast("stats").results(timeout_s=60,
                                                                                        return_exceptions=True)
    return [r["node_id"] for r in results if isinstance(r, dict)]


def main() -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from app import serve_env
    from deployments.builder import build_app

    serve_env.apply()  # ports of its own for Serve's HTTP ingress: the test session's cluster may still run
    store = 128 << 20  # object store per node: four nodes share this machine's /dev/shm
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"ingress_node": 1},
                                                            "object_store_memory": store})
    prefill_node = cluster.add_node(num_cpus=2, resources={"prefill_node": 1}, object_store_memory=store)
    decode_nodes = [cluster.add_node(num_cpus=2, resources={"decode_node": 1}, object_store_memory=store)
                    for _ in range(2)]
    seen: dict = {"timeline": []}  # [app, prompt tokens, status or "error", seconds] per request, in order
    timeline = seen["timeline"]
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = serve_env.free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})  # one machine
        serve.run(build_app({
            "placement": {"policy": "always_remote"},
            "kv_transfer": {"shared_memory_mib": 0, "timeout_s": 5, "prefill_timeout_s": 30},
            "ingress": {"num_cpus": 0.1, "resources": {"ingress_node": 0.01}},
            "prefill": {"num_replicas": 1, "num_cpus": 1, "resources": {"prefill_node": 0.5}},
            "decode": {"num_replicas": 2, "num_cpus": 1, "resources": {"decode_node": 0.5}},
        }), name="pd", route_prefix="/pd")
        serve.run(build_app({"mode": "collocated", "collocated": {"num_cpus": 1}}), name="colo", route_prefix="/colo")
        # 1. placement by resources
        prefill_at, decode_at = _nodes_of("pd", "Prefill"), _nodes_of("pd", "Decode")
        seen["nodes"] = {"prefill": prefill_at, "decode": decode_at}
        assert prefill_at == [prefill_node.node_id], seen
        assert sorted(decode_at) == sorted(n.node_id for n in decode_nodes), seen
        # 2. cross-node transfers give the collocated app's tokens
        prompts = [[(11 * i + 5 * j) % 4000 + 10 for j in range(20 + 23 * i)] for i in range(8)]
        base_pd, base_colo = f"http://127.0.0.1:{port}/pd", f"http://127.0.0.1:{port}/colo"
        replies = [_complete(base_pd, p, timeline) for p in prompts]
        seen["kv_sources"] = sorted({r["pdserve"]["kv_source"] for r in replies})
        seen["decode_replicas"] = len({r["pdserve"]["decode_replica"] for r in replies})
        assert seen["kv_sources"] == ["transfer"], seen
        assert [r["choices"][0]["text"] for r in replies] == [_complete(base_colo, p, timeline)["choices"][0]["text"]
                                                              for p in prompts]
        # 3. a decode node goes away with its replica: the other one serves
        cluster.remove_node(decode_nodes[0], allow_graceful=False)
        timeline.append(["decode node removed"])
        survivor = decode_nodes[1].node_id
        deadline, ok = time.monotonic() + 120, 0
        while time.monotonic() < deadline and ok < 8:
            try:
                reply = _complete(base_pd, prompts[ok], timeline)
                assert reply["choices"][0]["text"] == replies[ok]["choices"][0]["text"]
                ok += 1
            except AssertionError as exc:  # the ingress may still route to the lost replica until Serve notices
                seen.setdefault("errors_after_loss", []).append(str(exc)[:200])
                time.sleep(1)
        seen["served_after_loss"] = ok
        assert ok == 8, seen
        assert set(_nodes_of("pd", "Decode")) == {survivor}, seen  # a replacement may start there too
    except BaseException as exc:
        seen["error"] = repr(exc)[:1000]
        raise
    finally:
        print(json.dumps(seen), flush=True)
        serve_env.shutdown_serve()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
