"""The batch job, eval and the server on real Ray clusters on this machine, on loopback only: a local cluster
the job starts, and a two-node cluster (`ray start --head` plus `ray start --address`) this module starts and
stops. The nodes take linalign's loopback address (127.0.0.2 on Linux: Ray turns 127.0.0.1 into the machine's
network address) and authenticate with a token of this module's own.

The tiny random model decodes on the transformers backend, batch-invariant on CPU (and its peaked logits leave
no near-ties), so the Ray output must equal the single-process output record for record whatever the batches
(the job plans the same batches on both anyway)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from linalign.cli import app
from linalign.distributed import LOOPBACK
from linalign.serve.load import QUESTIONS

PRINCIPLE = "Answer in lowercase letters only."
RAY = str(Path(sys.executable).parent / "ray")
TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
ENV = os.environ | TOKEN | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_prompts(path: Path, n: int, extra: list[str] = ()) -> Path:
    rows = [json.dumps({"id": f"q{i}", "prompt": f"Question {i}: name a colour.", "n": i}) for i in range(n)]
    path.write_text("\n".join([*rows, *extra]) + "\n")
    return path


def job_args(tiny, source: Path, out: Path, tokens: int = 4) -> list[str]:
    return [
        *("generate", "--input", str(source), "--output", str(out), "--model", tiny.name),
        *("--method", "la", "-p", PRINCIPLE, "--max-new-tokens", str(tokens), "--batch-size", "2"),
    ]


def run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "linalign.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)


def start_job(args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "linalign.cli", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def single_process(tiny, source: Path, out: Path, tokens: int = 4) -> list[str]:
    result = CliRunner().invoke(app, job_args(tiny, source, out, tokens))
    assert result.exit_code == 0, result.output
    return sorted(out.read_text().splitlines())


def wait_for_lines(path: Path, n: int, job: subprocess.Popen, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline, "the job wrote nothing in time"
        time.sleep(0.2)


def ids_of(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_a_local_cluster_gives_the_single_process_output(tiny, tmp_path):
    source = write_prompts(tmp_path / "in.jsonl", 9, extra=["{broken"])
    expected = single_process(tiny, source, tmp_path / "local.jsonl")
    out = tmp_path / "ray.jsonl"
    result = run_cli([*job_args(tiny, source, out), "--ray", "--replicas", "2"])
    assert result.returncode == 0, result.stderr
    assert "line 10: bad JSON" in result.stderr and "1 malformed input lines skipped" in result.stderr
    assert sorted(out.read_text().splitlines()) == expected
    assert "9 records written" in result.stderr


class Node:
    """One `ray start --block` process on loopback; stopping it ends the node's processes with it."""

    def __init__(self, args: list[str]) -> None:
        command = [RAY, "start", "--block", f"--node-ip-address={LOOPBACK}", "--disable-usage-stats", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)

    def workers(self, name: str) -> list[psutil.Process]:
        """This node's worker processes whose title names `name` (Ray titles an actor's process after it)."""
        found = []
        for p in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if name in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def wait_for_nodes(address: str, n: int, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        probe = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, env=ENV)
        if probe.returncode == 0 and probe.stdout.count("node_") >= n:
            return
        time.sleep(1)
    raise AssertionError(f"the cluster at {address} did not reach {n} nodes in time")


@pytest.fixture(scope="module")
def cluster():
    """A head with one CPU and a second node with one CPU, both on loopback: two replicas of one CPU each
    can only run one on each node."""
    port = free_port()
    address = f"{LOOPBACK}:{port}"
    head = Node(["--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false"])
    nodes = [head]
    try:
        wait_for_nodes(address, 1)
        nodes.append(Node([f"--address={address}", "--num-cpus=1", "--num-gpus=0"]))
        wait_for_nodes(address, 2)
        yield address, nodes
    finally:
        for node in reversed(nodes):
            node.stop()


def test_a_two_node_cluster_gives_the_single_process_output(tiny, tmp_path, cluster):
    address, nodes = cluster
    source = write_prompts(tmp_path / "in.jsonl", 8)
    expected = single_process(tiny, source, tmp_path / "local.jsonl")
    out = tmp_path / "ray.jsonl"
    result = run_cli([*job_args(tiny, source, out), "--ray-address", address, "--replicas", "2"])
    assert result.returncode == 0, result.stderr
    assert sorted(out.read_text().splitlines()) == expected


@pytest.mark.parametrize("victim", ["worker", "driver"])
def test_a_killed_worker_or_driver_then_a_rerun_completes_the_file(tiny, tmp_path, cluster, victim):
    address, nodes = cluster
    n, tokens = 40, 24
    source = write_prompts(tmp_path / "in.jsonl", n)
    expected = single_process(tiny, source, tmp_path / "local.jsonl", tokens)
    out = tmp_path / "ray.jsonl"
    args = [*job_args(tiny, source, out, tokens), "--ray-address", address, "--replicas", "2"]
    job = start_job(args)
    try:
        wait_for_lines(out, 4, job)
        if victim == "worker":
            replicas = [p for node in nodes for p in node.workers("JobReplica")]
            assert replicas, "no replica process found"
            replicas[0].kill()
        else:
            job.kill()
        job.wait(timeout=240)  # a killed worker: Ray restarts it and retries its batch, or the job fails
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=30)
    before = len(out.read_text().splitlines())
    assert victim == "worker" or before < n  # the driver died mid-job
    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(ids_of(out)) == sorted(f"q{i}" for i in range(n))  # every id, once
    assert sorted(out.read_text().splitlines()) == expected


def test_bad_placements_fail_in_seconds_with_one_sentence(tiny, tmp_path, cluster, monkeypatch):
    address, _ = cluster
    for name, value in TOKEN.items():  # this process joins the cluster itself
        monkeypatch.setenv(name, value)
    source = write_prompts(tmp_path / "in.jsonl", 2)
    args = job_args(tiny, source, tmp_path / "out.jsonl")
    start = time.monotonic()
    unreachable = run_cli([*args, "--ray-address", f"127.0.0.1:{free_port()}"])
    assert time.monotonic() - start < 30  # Python and Ray's import included; the connection itself: refused at once
    assert unreachable.returncode == 2 and "no Ray cluster answers at 127.0.0.1:" in unreachable.stderr
    for extra, message in [
        (["--replicas", "0"], "--replicas must be an integer >= 1"),
        (["--cpus-per-replica", "0"], "--cpus-per-replica must be > 0"),
        (["--gpus-per-replica", "1"], "add --device cuda"),
        (["--gpus-per-replica", "1", "--device", "cuda"], "a replica asks for 1 GPUs, but the largest node"),
        (["--cpus-per-replica", "2"], "a replica asks for 2 CPUs, but the largest node of the cluster has 1"),
        (["--replicas", "3"], "3 replicas of 1 CPUs and 0 GPUs each do not fit the cluster: it has room for 2"),
    ]:
        result = CliRunner().invoke(app, [*args, "--ray-address", address, *extra])
        flat = " ".join(result.output.split())
        assert result.exit_code == 2 and message in flat and "Traceback" not in flat, (extra, result.output)
    for extra, message in [
        (["--replicas", "2", "--max-replicas", "1"], "--max-replicas must be at least --replicas (2), got 1"),
        (["--shutdown-grace", "-1"], "shutdown_grace must be >= 0 seconds"),
        (["--replicas", "3"], "3 replicas of 1 CPUs and 0 GPUs each do not fit the cluster: it has room for 2"),
    ]:
        result = CliRunner().invoke(app, ["serve", "--model", tiny.name, "--ray-address", address, *extra])
        flat = " ".join(result.output.split())
        assert result.exit_code == 2 and message in flat and "Traceback" not in flat, (extra, result.output)


def test_serving_replicas_answer_the_openai_client_like_one_server(tiny, cluster):
    import httpx
    from openai import OpenAI

    from linalign import Aligner
    from linalign.serve import create_app
    from linalign.serve.server import serving

    address, _ = cluster
    port = free_port()
    args = ["serve", "--model", tiny.name, "--ray-address", address, "--port", str(port), "--max-batch", "4"]
    server = start_job([*args, "--replicas", "2"])  # a replica takes 4 requests at once, the router the rest
    try:
        wait_for_line(server, "serving")
        request = {
            "model": tiny.name,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 6,
            "extra_body": {"linalign": {"method": "la", "principle": PRINCIPLE}},
        }
        url = f"http://127.0.0.1:{port}/v1"
        replicas = OpenAI(base_url=url, api_key="-", max_retries=0)
        with serving(create_app(Aligner(tiny))) as single_url:
            single = OpenAI(base_url=single_url, api_key="-", max_retries=0)
            expected = single.chat.completions.create(**request).choices[0].message.content
        assert replicas.chat.completions.create(**request).choices[0].message.content == expected
        chunks = replicas.chat.completions.create(**request, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        body = {**{k: v for k, v in request.items() if k != "extra_body"}, **request["extra_body"], "max_tokens": 2}

        def replica_of_a_reply(_: int) -> str:
            reply = httpx.post(f"{url}/chat/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            return reply.headers["x-linalign-replica"]

        with ThreadPoolExecutor(8) as pool:  # concurrent requests: Ray Serve's router spreads them over both
            answered_by = set(pool.map(replica_of_a_reply, range(16)))
        assert len(answered_by) == 2
        # /metrics is per replica: each scrape reports the counters of the replica that answered it
        accepted = {}
        for _ in range(40):
            scrape = httpx.get(f"{url.removesuffix('/v1')}/metrics", timeout=30)
            accepted[scrape.headers["x-linalign-replica"]] = metric(scrape.text, "linalign_requests_total")
            if len(accepted) == 2:
                break
        assert len(accepted) == 2 and min(accepted.values()) > 0 and sum(accepted.values()) == 18
    finally:
        stop(server, signal.SIGTERM)
    assert server.returncode == 0


def metric(text: str, name: str) -> float:
    """The value of one sample in Prometheus' text format."""
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def wait_for_line(process: subprocess.Popen, text: str, limit: float = 240) -> None:
    """Read the process's log until a line holds `text` (the replicas are up: 'serving')."""
    deadline = time.monotonic() + limit
    for line in process.stdout:
        if text in line:
            return
        assert time.monotonic() < deadline, f"no {text!r} in time"
    raise AssertionError(f"the process ended before {text!r}")


def stop(process: subprocess.Popen, sig: int, limit: float = 90) -> None:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise


def test_full_replicas_answer_429_then_sigterm_ends_their_streams_after_the_grace(cluster):
    """The built-in model, so that the streams run for many seconds on any CPU. Both replicas full and the
    router's queue too: a 429 with Retry-After. Then the first SIGTERM reaches the app in both replicas, which
    end their streams with a final error event at the grace."""
    import httpx

    address, _ = cluster
    grace, port = 1.0, free_port()
    args = ["serve", "--ray-address", address, "--replicas", "2", "--port", str(port), "--shutdown-grace", str(grace)]
    server = start_job([*args, "--max-batch", "2", "--max-queue", "1"])  # two streams a replica: four on both
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": QUESTIONS[2]}], "max_tokens": 1000, "stream": True}
    body |= {"temperature": 1.8, "seed": 3}  # sampled hot and seeded (so alike on any load): no early EOS
    started = [threading.Event() for _ in range(4)]
    streams: dict[int, tuple[str, list[str]]] = {}

    def stream(i: int) -> None:
        lines: list[str] = []
        with httpx.stream("POST", url, json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 2:  # the role, then the first token
                        started[i].set()
        streams[i] = (response.headers["x-linalign-replica"], lines)

    try:
        wait_for_line(server, "serving")
        with ThreadPoolExecutor(8) as pool:
            running = []
            for i in range(4):  # one after the other: the router's queue of one never holds two
                running.append(pool.submit(stream, i))
                assert started[i].wait(120), streams.get(i)
            # The proxies' queues fill up (one each), then refusals. One request at a time: the two nodes' proxies
            # share the port, and a proxy's router learns the queue limit only after its first request, so a burst
            # reaching a proxy that had none yet would all be queued.
            plain = {**body, "stream": False}
            extra = []
            for _ in range(4):
                extra.append(pool.submit(httpx.post, url, json=plain, timeout=120))
                deadline = time.monotonic() + 5
                while not extra[-1].done() and time.monotonic() < deadline:
                    time.sleep(0.1)
            refused = [f.result() for f in extra if f.done()]
            assert refused and all(r.status_code == 429 for r in refused), [r.text for r in refused]
            assert all(r.headers["retry-after"] == "1" for r in refused)
            start = time.monotonic()
            server.send_signal(signal.SIGTERM)
            for future in running:
                future.result(timeout=60)
        ended = time.monotonic() - start
        server.wait(timeout=60)
        took = time.monotonic() - start
    finally:
        stop(server, signal.SIGTERM)  # if still up: Serve leaves the module's cluster, whatever failed
    assert grace <= ended < grace + 10, ended
    assert took < grace + 30 and server.returncode == 0, (took, server.returncode)
    assert len({replica for replica, _ in streams.values()}) == 2  # the streams ran on both replicas
    for _, lines in streams.values():
        *_, error, done = lines
        assert done == "data: [DONE]"
        assert json.loads(error.removeprefix("data: "))["error"]["code"] == "server_shutting_down"


def test_eval_on_replicas_gives_the_local_summary(tiny, tmp_path, cluster):
    address, _ = cluster
    args = ["eval", "--suite", "principles", "--only", "lowercase,uppercase", "--limit", "3", "--model", tiny.name]
    args += ["--methods", "prompt,la", "--ratios", "1,4", "--max-new-tokens", "4", "--batch-size", "2"]
    local = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    on_ray = run_cli([*args, "--out", str(tmp_path / "ray"), "--ray-address", address, "--replicas", "2"])
    assert on_ray.returncode == 0, on_ray.stderr
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("local", "ray")]
    assert summaries[0] == summaries[1] and len(summaries[0]["runs"]) == 3
    records = [sorted((tmp_path / d / "generations.jsonl").read_text().splitlines()) for d in ("local", "ray")]
    assert records[0] == records[1] and len(records[0]) == 18  # 2 principles x 3 questions x 3 runs


def test_autoscaling_starts_with_the_least_replicas_and_adds_one_under_load(tiny, cluster):
    """--replicas 1 --max-replicas 2 with batches of one request: eight clients at a time hold more than a batch
    on the one replica, so Ray Serve's autoscaler adds the second (after its upscale delay, 30 s by default)."""
    import httpx

    address, _ = cluster
    port = free_port()
    args = ["serve", "--model", tiny.name, "--ray-address", address, "--port", str(port), "--max-batch", "1"]
    server = start_job([*args, "--replicas", "1", "--max-replicas", "2"])
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 64}

    def replica_of_a_reply(_: int) -> str:
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.headers["x-linalign-replica"]

    try:
        wait_for_line(server, "serving")
        waves = []
        deadline = time.monotonic() + 300
        with ThreadPoolExecutor(8) as pool:
            while len(set().union(*waves)) < 2 and time.monotonic() < deadline:
                waves.append(set(pool.map(replica_of_a_reply, range(8))))
    finally:
        stop(server, signal.SIGTERM)
    assert len(waves[0]) == 1  # one replica to start with
    assert len(set().union(*waves)) == 2, f"no second replica after {len(waves)} waves"
