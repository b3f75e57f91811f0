"""Two hosts with their own addresses: two network namespaces joined by a veth pair (a private /24
made here, traffic only between them), one rank in each, a 2-node ZeRO-3 training of the tiny
config through launchers/torchrun.sh (c10d rendezvous on the first host's address)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow
SUBNET = "10.213.47"  # private, exists only inside the two namespaces below
HOSTS = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2"}


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 `ip` is not installed (apt iproute2, or `make setup-test`)")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CAP_NET_ADMIN)")
    names = {h: f"gist{h}{os.getpid()}" for h in HOSTS}
    made = []
    try:
        for ns in names.values():
            probe = ip("netns", "add", ns, check=False)
            if probe.returncode:
                pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
            made.append(ns)
        # One veth pair, one end in each namespace; each end is called veth0 inside its namespace.
        ip("link", "add", "veth0", "netns", names["a"], "type", "veth", "peer", "name", "veth0", "netns", names["b"])
        for h, ns in names.items():
            ip("-n", ns, "addr", "add", f"{HOSTS[h]}/24", "dev", "veth0")
            ip("-n", ns, "link", "set", "veth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in made:  # deleting a namespace also removes its end of the veth pair (and so the pair)
            ip("netns", "delete", ns, check=False)


def test_two_node_zero3_training_across_namespaces(two_hosts, tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "RDZV_ENDPOINT": f"{HOSTS['a']}:29400",
        "RDZV_ID": f"two-hosts-{os.getpid()}",
        "GLOO_SOCKET_IFNAME": "veth0",
    }  # gloo would otherwise pick an address from the hostname
    procs = {}
    try:
        for h, ns in two_hosts.items():
            procs[h] = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    str(ROOT / "launchers" / "torchrun.sh"),
                    TINY,
                    f"output_dir={out}",
                    "train.max_steps=6",
                    "train.eval_batches=1",
                ],
                # veth0 is not the address of the hostname: say which host runs the rendezvous store.
                env={**env, "LOCAL_ADDR": HOSTS[h], "RDZV_CONF": f"is_host={int(h == 'a')}"},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        logs = {h: p.communicate(timeout=900)[0] for h, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    for h, p in procs.items():
        assert p.returncode == 0, f"host {h} exited {p.returncode}\n{logs[h][-5000:]}"
    # Nodes are ranked by address: rank 0 on host a, and every rank met at host a's address.
    assert f"2 ranks from torchrun, master {HOSTS['a']}:" in logs["a"]
    assert "gist-dist: 2 ranks" not in logs["b"]  # rank 1 logs nothing of its own
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = records[0]
    assert start["event"] == "start" and start["world_size"] == 2
    # ZeRO-3 really sharded the model across the two hosts: each holds only part of it.
    assert len(start["rank_param_bytes"]) == 2 and max(start["rank_param_bytes"]) < start["model_param_bytes"]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert (out / "final" / "model.safetensors").is_file()
