#!/usr/bin/env python3
"""Real Kafka clients for the Kafka lab, its tests and its benchmark: confluent-kafka (librdkafka)
or kafka-python, chosen with --lib. Prints one JSON object on stdout: what happened, with Kafka's
error codes (29 = TOPIC_AUTHORIZATION_FAILED), so tests and people read the same output.

  kafka-client.py produce  --topic orders --count 3 [--size 100] [--lib confluent|python]
  kafka-client.py consume  --topic orders --count 3 [--group g] [--lib confluent|python]
  kafka-client.py bench-produce --topic t --count 100000 --size 100
  kafka-client.py bench-consume --topic t --count 100000
  kafka-client.py bench-latency --topic t --count 2000      # one produce request at a time
Options: --bootstrap kafka:9092, --client-id ID, --timeout SECONDS.
"""
import argparse
import json
import sys
import time


def out(obj):
    print(json.dumps(obj), flush=True)


def python_error(e):
    """kafka-python's error as {code, name, str}: its errno, else the "[Error N]" it wraps."""
    import re

    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"\[Error (-?\d+)\]", str(e))
        code = int(m.group(1)) if m else -1
    return {"code": code, "name": type(e).__name__, "str": str(e)}


def confluent_produce(a):
    from confluent_kafka import KafkaException, Producer

    p = Producer({
        "bootstrap.servers": a.bootstrap,
        "client.id": a.client_id,
        "acks": "all",
        "message.timeout.ms": int(a.timeout * 1000),
        "linger.ms": 5,
        "message.max.bytes": max(1_000_000, a.size + 100_000),
    })
    res = {"delivered": 0, "errors": []}

    def done(err, msg):
        if err is None:
            res["delivered"] += 1
        else:
            res["errors"].append({"code": err.code(), "name": err.name(), "str": err.str()})

    payload = b"x" * a.size
    for i in range(a.count):
        value = (f"{a.value}-{i}".encode() if a.value else payload)
        while True:
            try:
                p.produce(a.topic, value=value, callback=done)
                break
            except BufferError:
                p.poll(0.05)
            except KafkaException as e:
                res["errors"].append({"code": e.args[0].code(), "name": e.args[0].name(), "str": e.args[0].str()})
                break
        p.poll(0)
    p.flush(a.timeout + 5)
    return res


def python_produce(a):
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    res = {"delivered": 0, "errors": []}
    try:
        p = KafkaProducer(bootstrap_servers=a.bootstrap, client_id=a.client_id, acks="all",
                          max_block_ms=int(a.timeout * 1000), request_timeout_ms=int(a.timeout * 1000))
    except KafkaError as e:
        res["errors"].append(python_error(e))
        return res
    futures = []
    for i in range(a.count):
        value = (f"{a.value}-{i}".encode() if a.value else b"x" * a.size)
        try:
            futures.append(p.send(a.topic, value=value))
        except KafkaError as e:
            res["errors"].append(python_error(e))
    for f in futures:
        try:
            f.get(timeout=a.timeout)
            res["delivered"] += 1
        except KafkaError as e:
            res["errors"].append(python_error(e))
    p.close(timeout=5)
    return res


def confluent_consume(a):
    from confluent_kafka import Consumer

    c = Consumer({
        "bootstrap.servers": a.bootstrap,
        "client.id": a.client_id,
        "group.id": a.group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    res = {"messages": [], "errors": [], "committed": False}
    c.subscribe([a.topic])
    deadline = time.monotonic() + a.timeout
    while len(res["messages"]) < a.count and time.monotonic() < deadline:
        m = c.poll(0.2)
        if m is None:
            continue
        if m.error():
            e = m.error()
            res["errors"].append({"code": e.code(), "name": e.name(), "str": e.str()})
            if e.fatal() or e.code() == 29:
                break
            continue
        res["messages"].append(m.value().decode(errors="replace"))
    if res["messages"]:
        try:
            c.commit(asynchronous=False)
            res["committed"] = True
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            res["errors"].append({"code": e.args[0].code(), "name": e.args[0].name(), "str": e.args[0].str()})
    c.close()
    return res


def python_consume(a):
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    res = {"messages": [], "errors": [], "committed": False}
    try:
        c = KafkaConsumer(a.topic, bootstrap_servers=a.bootstrap, client_id=a.client_id, group_id=a.group,
                          auto_offset_reset="earliest", enable_auto_commit=False,
                          consumer_timeout_ms=int(a.timeout * 1000))
        deadline = time.monotonic() + a.timeout
        while len(res["messages"]) < a.count and time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=200).values():
                res["messages"].extend(m.value.decode(errors="replace") for m in batch)
        if res["messages"]:
            c.commit()
            res["committed"] = True
        c.close()
    except KafkaError as e:
        res["errors"].append(python_error(e))
    return res


def bench_produce(a):
    from confluent_kafka import Producer

    p = Producer({
        "bootstrap.servers": a.bootstrap,
        "client.id": a.client_id,
        "acks": "1",
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
    })
    errors = 0
    latencies = []

    def done(err, msg):
        nonlocal errors
        if err is not None:
            errors += 1
        else:
            lat = msg.latency()
            if lat is not None:
                latencies.append(lat)

    payload = b"x" * a.size
    start = time.monotonic()
    for _ in range(a.count):
        while True:
            try:
                p.produce(a.topic, value=payload, callback=done)
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    p.flush(120)
    secs = time.monotonic() - start
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else None
    return {"messages": a.count, "errors": errors, "secs": secs, "msgs_per_s": a.count / secs,
            "mb_per_s": a.count * a.size / secs / 1e6, "p99_ms": p99 * 1000 if p99 is not None else None}


def bench_latency(a):
    """One produce request at a time (linger 0, each waited for): the round trip of each."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": a.bootstrap, "client.id": a.client_id, "acks": "1", "linger.ms": 0})
    p.produce(a.topic, value=b"warm-up")
    p.flush(10)
    rtts = []
    payload = b"x" * a.size
    for _ in range(a.count):
        t = time.perf_counter()
        p.produce(a.topic, value=payload)
        if p.flush(10) != 0:
            return {"requests": len(rtts), "error": "a produce request got no answer in 10 s"}
        rtts.append(time.perf_counter() - t)
    rtts.sort()
    return {"requests": len(rtts), "p50_ms": rtts[len(rtts) // 2] * 1000, "p99_ms": rtts[int(len(rtts) * 0.99)] * 1000}


def bench_consume(a):
    from confluent_kafka import Consumer

    c = Consumer({
        "bootstrap.servers": a.bootstrap,
        "client.id": a.client_id,
        "group.id": a.group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "fetch.max.bytes": 52_428_800,
        "max.partition.fetch.bytes": 52_428_800,
        "fetch.wait.max.ms": 100,
    })
    c.subscribe([a.topic])
    n = size = 0
    start = None
    deadline = time.monotonic() + a.timeout
    while n < a.count and time.monotonic() < deadline:
        msgs = c.consume(10_000, 0.5)
        for m in msgs:
            if m.error():
                continue
            if start is None:
                start = time.monotonic()
            n += 1
            size += len(m.value())
    secs = time.monotonic() - (start or time.monotonic())
    c.close()
    return {"messages": n, "secs": secs, "msgs_per_s": n / secs if secs else 0.0,
            "mb_per_s": size / secs / 1e6 if secs else 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["produce", "consume", "bench-produce", "bench-consume", "bench-latency"])
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--value", default="", help="message text (NAME-i); default: SIZE bytes of x")
    ap.add_argument("--group", default="porin-lab")
    ap.add_argument("--bootstrap", default="kafka:9092")
    ap.add_argument("--client-id", default="porin-lab")
    ap.add_argument("--lib", choices=["confluent", "python"], default="confluent")
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args()
    if a.action == "bench-produce":
        res = bench_produce(a)
    elif a.action == "bench-consume":
        res = bench_consume(a)
    elif a.action == "bench-latency":
        res = bench_latency(a)
    elif a.action == "produce":
        res = (confluent_produce if a.lib == "confluent" else python_produce)(a)
    else:
        res = (confluent_consume if a.lib == "confluent" else python_consume)(a)
    out(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
