"""``kvsim plan --disagg`` (kvsim.plan.disagg): the fewest GPUs across the prefill/decode split, per method."""

from __future__ import annotations

import json

from kvsim.config import EngineConfig
from kvsim.plan.disagg import PDPlanner, plan_disagg
from kvsim.workload.synthetic import FixedLengths, synthetic_requests

SLO = "ttft_ms:p99=400,tpot_ms:p99=30"
CFG = EngineConfig(max_num_batched_tokens=2048)


def trace(rate=40.0, n=150):
    return list(synthetic_requests(n, rate, seed=3, lengths=FixedLengths(1500, 64)))


def test_the_search_finds_a_cluster_nothing_cheaper_beats():
    pl = PDPlanner(trace(), SLO, {"kv_transfer_link": "rdma-100g"}, model="llama-3.1-8b", hardware="h100", config=CFG,
                   auto_profile=False)
    row = pl.min_gpus_pd("none", 1, 1, max_instances=8)
    assert row["status"] == "ok"
    n_p, n_d = row["num_prefill_instances"], row["num_decode_instances"]
    assert pl.evaluate_pd("none", 1, n_p, 1, n_d).feasible
    # one fewer on either side misses the SLO (each was evaluated by the search: cached, no new replay)
    n = len(pl.pd_log)
    for a, b in ((n_p - 1, n_d), (n_p, n_d - 1)):
        if a >= 1 and b >= 1:
            assert not pl.evaluate_pd("none", 1, a, 1, b).feasible
    # and no evaluated cluster with fewer GPUs was feasible
    assert not any(e.feasible and e.gpus < row["gpus"] for e in pl.pd_log)
    assert row["num_replays"] <= 3 * 8
    assert len(pl.pd_log) - n <= 2
    # the transfer of every point was the full cache of a 1500-token prompt (Llama-3.1-8B: 128 KiB a token)
    assert row["kv_transfer_bytes_per_request"] == 1500 * 131072


def test_plan_disagg_rows_beside_colocated_and_files(tmp_path):
    res = plan_disagg(trace(), SLO, ["none", "fp8"], model="llama-3.1-8b", hardware="h100", config=CFG,
                      transfer={"kv_transfer_link": "rdma-200g"}, max_instances=6, auto_profile=False, out_dir=tmp_path)
    assert [r["method"].split(":")[0] for r in res.rows] == ["none", "fp8"]
    for r in res.rows:
        assert r["status"] == "ok" and r["gpus"] == r["num_prefill_instances"] + r["num_decode_instances"]
        assert r["colocated_gpus"] is not None
    # fp8 moves half the bytes of the bf16 cache
    none, fp8 = res.rows
    assert fp8["kv_transfer_bytes_per_request"] == none["kv_transfer_bytes_per_request"] / 2
    for name in ("plan_disagg.csv", "plan_disagg.md", "plan_disagg.json", "plan_disagg_candidates.csv"):
        assert (tmp_path / name).exists()
    doc = json.loads((tmp_path / "plan_disagg.json").read_text())
    assert doc["colocated"] and doc["evaluations"]
    assert "prefill + decode" in (tmp_path / "plan_disagg.md").read_text()


def test_cli_plan_disagg(tmp_path, capsys):
    from kvsim.cli import main
    from kvsim.workload.readers import write_trace

    path = tmp_path / "t.jsonl"
    write_trace(trace(n=80), path)
    rc = main(["plan", str(path), "--slo", SLO, "--methods", "none", "--disagg", "--out", str(tmp_path / "p"), "--quiet",
               "--no-profile", "--max-num-batched-tokens", "2048", "--max-replicas", "6", "--kv-transfer-link", "nvlink-4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "prefill + decode" in out and "co-located" in out
    # the instance counts are what --disagg searches
    rc = main(["plan", str(path), "--slo", SLO, "--disagg", "--num-prefill-instances", "2", "--num-decode-instances", "1",
               "--out", str(tmp_path / "q"), "--quiet", "--no-profile"])
    assert rc == 2 and "searches the instance counts" in capsys.readouterr().err
    rc = main(["plan", str(path), "--slo", SLO, "--num-prefill-instances", "2", "--num-decode-instances", "1",
               "--out", str(tmp_path / "q"), "--quiet", "--no-profile"])
    assert rc == 2 and "--disagg" in capsys.readouterr().err


def test_colocated_plan_with_a_cpu_tier():
    from kvsim.plan import plan_capacity

    res = plan_capacity(trace(n=60), SLO, ["none"], config=CFG, auto_profile=False, max_replicas=8,
                        transfer={"kv_offloading_size": 4})
    assert res.rows[0]["status"] == "ok"
    bad = plan_capacity(trace(n=20), SLO, ["none"], config=CFG, auto_profile=False, max_replicas=2,
                        transfer={"kv_transfer_mode": "layerwise"}).rows[0]
    assert bad["status"] == "error" and "need --num-prefill-instances" in bad["note"]
