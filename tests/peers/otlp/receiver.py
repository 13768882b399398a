#!/usr/bin/env python3
"""OTLP/gRPC receiver for the export tests: the official opentelemetry-proto services.

    receiver.py --out FILE [--listen HOST:PORT] [--raw FILE]

Serves opentelemetry.proto.collector.logs.v1.LogsService/Export and
opentelemetry.proto.collector.metrics.v1.MetricsService/Export (the generated code of the
`opentelemetry-proto` PyPI package). Each log record and each metric data point received is
appended to FILE as one JSON line, flushed before the request is answered (so a record in the
file was acknowledged, and one acknowledged is in the file):

    {"signal":"log","time_unix_nano":N,"severity_number":N,"severity_text":S,"event_name":S,
     "trace_id":HEX,"span_id":HEX,"body":V,"attributes":{K:V},"resource":{K:V},"scope":S}
    {"signal":"metric","name":S,"description":S,"unit":S,"kind":"sum|gauge|histogram",
     "monotonic":B,"attributes":{K:V},"value":N,"count":N,"sum":N,"bounds":[..],
     "bucket_counts":[..],"time_unix_nano":N,"resource":{K:V},"scope":S}

`--raw FILE` also appends every request's bytes as received (serialized protobuf), for a test
that searches the payloads themselves.

Once serving it prints one stdout line: {"event":"listening","address":"HOST:PORT"}.
`--listen` with a port (the default picks one) lets a test restart it where it was. SIGTERM or
SIGINT stop it.
"""

import argparse
import json
import signal
import sys
import threading
from concurrent import futures

sys.dont_write_bytecode = True  # no __pycache__ next to the script

import grpc  # noqa: E402
from opentelemetry.proto.collector.logs.v1 import (  # noqa: E402
    logs_service_pb2,
    logs_service_pb2_grpc,
)
from opentelemetry.proto.collector.metrics.v1 import (  # noqa: E402
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


class Sink:
    def __init__(self, path, raw=None):
        self.lock = threading.Lock()
        self.file = open(path, "a", encoding="utf-8")
        self.raw = open(raw, "ab") if raw else None

    def write_raw(self, request):
        if self.raw is not None:
            with self.lock:
                self.raw.write(request.SerializeToString())
                self.raw.flush()

    def write(self, lines):
        text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
        with self.lock:
            self.file.write(text)
            self.file.flush()


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        self.sink.write_raw(request)
        lines = []
        for rl in request.resource_logs:
            resource = attributes(rl.resource.attributes)
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    lines.append({
                        "signal": "log",
                        "time_unix_nano": r.time_unix_nano,
                        "observed_time_unix_nano": r.observed_time_unix_nano,
                        "severity_number": r.severity_number,
                        "severity_text": r.severity_text,
                        "event_name": r.event_name,
                        "trace_id": r.trace_id.hex(),
                        "span_id": r.span_id.hex(),
                        "body": any_value(r.body),
                        "attributes": attributes(r.attributes),
                        "resource": resource,
                        "scope": sl.scope.name,
                    })
        self.sink.write(lines)
        return logs_service_pb2.ExportLogsServiceResponse()


def number(p):
    return p.as_int if p.WhichOneof("value") == "as_int" else p.as_double


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        self.sink.write_raw(request)
        lines = []
        for rm in request.resource_metrics:
            resource = attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    base = {"signal": "metric", "name": m.name, "description": m.description,
                            "unit": m.unit, "resource": resource, "scope": sm.scope.name}
                    kind = m.WhichOneof("data")
                    if kind in ("sum", "gauge"):
                        data = getattr(m, kind)
                        for p in data.data_points:
                            lines.append(dict(base, kind=kind,
                                              monotonic=kind == "sum" and data.is_monotonic,
                                              attributes=attributes(p.attributes),
                                              value=number(p), time_unix_nano=p.time_unix_nano))
                    elif kind == "histogram":
                        for p in m.histogram.data_points:
                            lines.append(dict(base, kind=kind,
                                              attributes=attributes(p.attributes),
                                              count=p.count, sum=p.sum,
                                              bounds=list(p.explicit_bounds),
                                              bucket_counts=list(p.bucket_counts),
                                              time_unix_nano=p.time_unix_nano))
                    else:
                        lines.append(dict(base, kind=kind))
        self.sink.write(lines)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="file the JSON lines are appended to")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT, port 0 for any")
    parser.add_argument("--raw", help="file every request's serialized bytes are appended to")
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    sink = Sink(args.out, args.raw)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        # Off: a second receiver must not bind a busy port silently.
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)],
    )
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(sink), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(sink), server)
    port = server.add_insecure_port(args.listen)
    if port == 0:
        sys.exit("receiver.py: cannot listen on %s" % args.listen)
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    print(json.dumps({"event": "listening", "address": "%s:%d" % (host, port)},
                     separators=(",", ":")), flush=True)
    stop.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
